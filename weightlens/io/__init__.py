"""Checkpoints in and out: ``load`` any source lazily; (later) ``export`` merges atomically."""

from weightlens.io.sources import Checkpoint, TensorInfo, load

__all__ = ["Checkpoint", "TensorInfo", "load"]
