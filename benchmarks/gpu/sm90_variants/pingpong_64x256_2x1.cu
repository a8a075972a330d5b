// Ping-pong: two consumer warpgroups take turns, so one's epilogue overlaps the
// other's mainloop (the library's cooperative kernel runs the epilogue alone).
#include "variant.cuh"

using Tile = cute::Shape<cute::_64, cute::_256, cute::_64>;
using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
DSX_SM90_VARIANT(pingpong_64x256_2x1, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                 cutlass::epilogue::TmaWarpSpecialized, cutlass::gemm::PersistentScheduler)
