"""One exception family for weightlens.

Every error subclasses :class:`WeightlensError` *and* the builtin a caller would already catch
(``KeyError``, ``ValueError``, ``TypeError``), so existing ``except`` clauses keep working.
Messages say what went wrong, where (file and tensor key), what was expected, what was found,
and what to do.
"""

from __future__ import annotations

__all__ = [
    "WeightlensError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "TargetExistsError",
    "DTypeError",
    "NonFiniteError",
    "InvalidParameterError",
    "UnsafePathError",
    "ReproducibilityError",
    "PlanRefusedError",
]


class WeightlensError(Exception):
    """Base class of every error weightlens raises on purpose."""


class CheckpointError(WeightlensError, ValueError):
    """A checkpoint cannot be read: missing, corrupt, truncated or of an unknown format."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint holds objects other than tensors and plain containers."""


class KeyMismatchError(WeightlensError, KeyError):
    """Checkpoints that must share keys do not, or a requested key does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(WeightlensError, ValueError):
    """Tensors that must share a shape do not."""


class DTypeError(WeightlensError, TypeError):
    """A tensor has a dtype the operation cannot use (e.g. integers where floats are needed)."""


class NonFiniteError(WeightlensError, ValueError):
    """A tensor holds NaN or Inf values."""


class TargetExistsError(WeightlensError, FileExistsError):
    """An output folder exists and is not empty (pass ``overwrite=True`` to replace it)."""


class InvalidParameterError(WeightlensError, ValueError, TypeError):
    """A public function got a parameter outside its documented range or options."""


class UnsafePathError(WeightlensError, ValueError):
    """An output path that writing to could lose the user's data (the current folder, home, an input)."""


class ReproducibilityError(WeightlensError, ValueError):
    """A recipe's inputs changed since it was written, or its re-run did not give the recorded files."""


class PlanRefusedError(WeightlensError, MemoryError):
    """A planned run cannot fit in the memory available (``wl.plan(...).check()``, ``weightlens merge``)."""
