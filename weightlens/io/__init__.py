"""Checkpoints in and out: ``load`` any source lazily; ``export`` merges atomically, with a recipe."""

from weightlens.io.sources import AdapterCheckpoint, Checkpoint, LoraFactors, TensorInfo, load
from weightlens.io.export import ExportOptions, TargetExistsError, export
from weightlens.io._adapter_export import export_adapter
from weightlens.io.recipe import Recipe, load_recipe

__all__ = ["AdapterCheckpoint", "Checkpoint", "ExportOptions", "LoraFactors", "Recipe", "TargetExistsError", "TensorInfo", "export", "export_adapter", "load", "load_recipe"]
