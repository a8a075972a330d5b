// Ping-pong with square 128x128 tiles.
#include "variant.cuh"

using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
DSX_SM90_VARIANT(pingpong_128x128_2x1, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                 cutlass::epilogue::TmaWarpSpecialized, cutlass::gemm::PersistentScheduler)
