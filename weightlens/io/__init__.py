"""Checkpoints in and out: ``load`` any source lazily; ``export`` merges atomically, with a recipe."""

from weightlens.io.sources import Checkpoint, TensorInfo, load
from weightlens.io.export import TargetExistsError, export
from weightlens.io.recipe import Recipe, load_recipe

__all__ = ["Checkpoint", "Recipe", "TargetExistsError", "TensorInfo", "export", "load", "load_recipe"]
