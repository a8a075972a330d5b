// Python bindings of the sm90 GEMM variants (built by bench_gemm_sm90_variants.py).
#include <torch/extension.h>

#define DSX_DECLARE(NAME)                                                                  \
  bool NAME(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,        \
            const at::Tensor& found_inf, const at::Tensor& out);
DSX_DECLARE(pingpong_64x256_2x1)
DSX_DECLARE(pingpong_128x128_2x1)
DSX_DECLARE(coop_256x128_1x2)
DSX_DECLARE(coop_128x256_2x1_streamk)
DSX_DECLARE(coop_128x256_1x2)
DSX_DECLARE(coop_128x256_2x2)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pingpong_64x256_2x1", &pingpong_64x256_2x1);
  m.def("pingpong_128x128_2x1", &pingpong_128x128_2x1);
  m.def("coop_256x128_1x2", &coop_256x128_1x2);
  m.def("coop_128x256_2x1_streamk", &coop_128x256_2x1_streamk);
  m.def("coop_128x256_1x2", &coop_128x256_1x2);
  m.def("coop_128x256_2x2", &coop_128x256_2x2);
}
