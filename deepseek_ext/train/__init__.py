"""Training-system pieces that plug into any PyTorch loop: the progressive
schedule and the monitor (the data pipeline is :mod:`deepseek_ext.data`)."""

from deepseek_ext.train.monitor import Monitor
from deepseek_ext.train.progressive import FractionSampler, ProgressiveSchedule, growth_order

__all__ = ["Monitor", "ProgressiveSchedule", "FractionSampler", "growth_order"]
