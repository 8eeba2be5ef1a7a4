"""weightlens: see why a merge of neural networks works or fails, then export the one you chose.

Examples
--------
>>> import weightlens as wl
>>> ckpt = wl.load({"w": __import__("torch").zeros(2, 3)})
>>> ckpt.shape("w")
(2, 3)
"""

from weightlens.errors import (
    CheckpointError,
    DTypeError,
    InvalidParameterError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    UnsafeCheckpointError,
    WeightlensError,
)
from weightlens.io import Checkpoint, load
from weightlens.taskvectors import TaskVectors

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DTypeError",
    "InvalidParameterError",
    "KeyMismatchError",
    "NonFiniteError",
    "ShapeMismatchError",
    "TaskVectors",
    "UnsafeCheckpointError",
    "WeightlensError",
    "__version__",
    "load",
]
