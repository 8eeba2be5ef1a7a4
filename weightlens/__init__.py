"""weightlens: see why a merge of neural networks works or fails, then export the one you chose.

``load`` and ``TaskVectors`` are imported eagerly; ``analyze``, ``merge``, ``compare``, ``diagnose``, ``sweep``,
``plan``, ``export`` and the subpackages ``lmc``, ``rebasin``, ``widgets``, ``figures``, ``zoo`` and ``linalg``
load on first use, so ``import weightlens`` stays light (no plotly, no ipywidgets).
``weightlens.config`` holds session-wide settings (``wl.config.progress = False`` silences every bar).

Examples
--------
>>> import weightlens as wl
>>> ckpt = wl.load({"w": __import__("torch").zeros(2, 3)})
>>> ckpt.shape("w")
(2, 3)
"""

import importlib
import sys
import types
from typing import Any

from weightlens.errors import (
    CheckpointError,
    DTypeError,
    InvalidParameterError,
    KeyMismatchError,
    NonFiniteError,
    PlanRefusedError,
    ReproducibilityError,
    ShapeMismatchError,
    TargetExistsError,
    UnsafeCheckpointError,
    UnsafePathError,
    WeightlensError,
)
from weightlens import config
from weightlens.io import Checkpoint, load
from weightlens.taskvectors import TaskVectors

from weightlens._version import __version__

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "analyze": ("weightlens.analysis", "analyze"),
    "Report": ("weightlens.analysis", "Report"),
    "merge": ("weightlens.merge", "merge"),
    "compare": ("weightlens.merge", "compare"),
    "diagnose": ("weightlens.diagnosis", "diagnose"),
    "Diagnosis": ("weightlens.diagnosis", "Diagnosis"),
    "sweep": ("weightlens.merge", "sweep"),
    "export": ("weightlens.io", "export"),
    "run_recipe": ("weightlens.merge", "run_recipe"),
    "plan": ("weightlens.planning", "plan"),
    "Plan": ("weightlens.planning", "Plan"),
    "planning": ("weightlens.planning", None),
    "analysis": ("weightlens.analysis", None),
    "figures": ("weightlens.figures", None),
    "linalg": ("weightlens.linalg", None),
    "lmc": ("weightlens.lmc", None),
    "rebasin": ("weightlens.rebasin", None),
    "widgets": ("weightlens.widgets", None),
    "zoo": ("weightlens.zoo", None),
}


class _Package(types.ModuleType):
    """``weightlens`` itself: importing the subpackage ``weightlens.merge`` must not replace the
    function ``wl.merge`` (the import system binds a subpackage on its parent by name)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_NAMED_LIKE_SUBPACKAGES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_FUNCTIONS_NAMED_LIKE_SUBPACKAGES = {"merge"}
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'weightlens' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DTypeError",
    "InvalidParameterError",
    "KeyMismatchError",
    "NonFiniteError",
    "PlanRefusedError",
    "ReproducibilityError",
    "ShapeMismatchError",
    "TargetExistsError",
    "TaskVectors",
    "UnsafeCheckpointError",
    "UnsafePathError",
    "WeightlensError",
    "__version__",
    "config",
    "load",
    *_LAZY,
]
