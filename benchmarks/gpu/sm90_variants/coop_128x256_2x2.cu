// The library's 128x256 cooperative tile in 2x2 clusters: each A and each B
// tile is loaded once for two CTAs (TMA multicast both ways), half the L2 reads
// of unclustered CTAs.
#include "variant.cuh"

using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Cluster = cute::Shape<cute::_2, cute::_2, cute::_1>;
DSX_SM90_VARIANT(coop_128x256_2x2, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                 cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler)
