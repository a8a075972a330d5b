"""DDP communication hooks and their state (gradient compression, local SGD).

- :class:`Int8CompressionState` + :func:`int8_compress_hook`: blockwise int8
  all-to-all reduce-scatter + all-gather with error feedback, flat or
  hierarchical (bf16 inside a node, int8 between nodes).
- :class:`CountingAllreduceState` + :func:`counting_allreduce_hook`: DDP's
  plain averaging allreduce, counted the same way (a like-for-like baseline).
- :class:`AdaptiveLocalSGD` + :func:`adaptive_local_sgd_hook`: local SGD with
  an averaging period that adapts to how far the ranks drift apart.
- :func:`enable_int8_reduce_scatter` (:class:`Int8ReduceScatterState`,
  :class:`Int8ReduceScatter`): FSDP2's gradient reduce-scatter sent as int8
  with error feedback; optionally the parameter all-gather as int8
  (:class:`Int8AllGather`).
- :func:`fully_shard_per_block`: FSDP2 per block for models whose blocks share
  modules (cross-layer attention sharing).
"""

from deepseek_ext.distributed.allreduce_hook import CountingAllreduceState, counting_allreduce_hook
from deepseek_ext.distributed.fsdp import fully_shard_per_block, modules_shared_by_blocks
from deepseek_ext.distributed.fsdp_int8 import (
    Int8AllGather,
    Int8ReduceScatter,
    Int8ReduceScatterState,
    enable_int8_reduce_scatter,
)
from deepseek_ext.distributed.int8_hook import int8_compress_hook
from deepseek_ext.distributed.int8_state import Int8CompressionState
from deepseek_ext.distributed.local_sgd import AdaptiveLocalSGD, adaptive_local_sgd_hook

__all__ = [
    "Int8CompressionState",
    "int8_compress_hook",
    "CountingAllreduceState",
    "counting_allreduce_hook",
    "AdaptiveLocalSGD",
    "adaptive_local_sgd_hook",
    "Int8ReduceScatterState",
    "Int8ReduceScatter",
    "Int8AllGather",
    "enable_int8_reduce_scatter",
    "fully_shard_per_block",
    "modules_shared_by_blocks",
]
