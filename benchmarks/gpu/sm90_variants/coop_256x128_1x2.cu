// Cooperative with the tile turned: 256 rows of the output by 128 columns.
#include "variant.cuh"

using Tile = cute::Shape<cute::_256, cute::_128, cute::_64>;
using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
DSX_SM90_VARIANT(coop_256x128_1x2, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                 cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler)
