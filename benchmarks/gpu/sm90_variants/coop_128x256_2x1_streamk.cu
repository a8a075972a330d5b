// The library's large-tile configuration with a stream-K tile scheduler, which
// splits K across CTAs to fill the last wave (the long-K weight gradient).
#include "variant.cuh"

using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
DSX_SM90_VARIANT(coop_128x256_2x1_streamk, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                 cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler)
