// Unscales a few gradients with deepseek_ext from plain C++ (LibTorch), once
// through the typed entry point and once through the dispatcher by name.
// Exits non-zero if the results are wrong.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <deepseek_ext/ops.h>

#include <iostream>
#include <limits>
#include <vector>

int main() {
  std::vector<at::Tensor> grads = {at::full({3}, 4.0f), at::full({2, 2}, 8.0f, at::kHalf),
                                   at::full({5}, 2.0f, at::kBFloat16)};
  auto found_inf = at::zeros({1});
  const auto inv_scale = at::full({1}, 0.25f);

  deepseek_ext::unscale_and_check_(grads, found_inf, inv_scale);
  bool ok = found_inf.item<float>() == 0.0f && at::all(grads[0] == 1.0f).item<bool>() &&
            at::all(grads[1] == 2.0f).item<bool>() && at::all(grads[2] == 0.5f).item<bool>();
  std::cout << "unscaled: " << grads[0][0].item<float>() << " " << grads[1][0][0].item<float>()
            << " " << grads[2][0].item<float>() << ", found_inf " << found_inf.item<float>() << "\n";

  // The same op by name, as any dispatcher client (TorchScript, other libraries) sees it.
  grads[2][4] = std::numeric_limits<float>::quiet_NaN();
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("deepseek_ext::unscale_and_check_", "")
                .typed<void(at::TensorList, const at::Tensor&, const at::Tensor&)>();
  op.call(grads, found_inf, at::ones({1}));
  ok = ok && found_inf.item<float>() == 1.0f;
  std::cout << "after planting a NaN: found_inf " << found_inf.item<float>() << "\n";
  std::cout << (ok ? "OK" : "WRONG RESULT") << std::endl;
  return ok ? 0 : 1;
}
