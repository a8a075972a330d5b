// The library's 128x256 cooperative tile with the cluster turned: two CTAs side
// by side along N share (multicast) their A tile instead of their B tile.
#include "variant.cuh"

using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
DSX_SM90_VARIANT(coop_128x256_1x2, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                 cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler)
