"""Data plumbing shared by the evaluator and the normalisation passes: batches and eval modes.

A *data* argument is one of

* a tensor of inputs (no targets);
* a *tuple* ``(inputs, targets)`` of tensors with the same first dimension, cut into batches of
  ``batch_size`` rows (``None``: one batch);
* any re-iterable of batches (a ``DataLoader``, a *list*), each batch a tensor of inputs or a
  sequence ``(inputs, targets, ...)``. A list of two tensors is two batches, never a pair. A
  one-shot iterator (a generator) is read into a list once, so it can be used for every alpha.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from weightlens.errors import InvalidParameterError

__all__ = ["Batches", "batchnorm_modules", "eval_mode"]

Batch = tuple[Tensor, Tensor | None]


def _is_pair(data: object) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[0].shape[:1] == data[1].shape[:1]
    )


class Batches:
    """A re-iterable view of *data* yielding ``(inputs, targets or None)`` batches.

    Parameters
    ----------
    data : Tensor, tuple (Tensor, Tensor) or iterable of batches
        See the module docstring.
    batch_size : int, optional
        Rows per batch when ``data`` is a tensor or a pair of tensors; ``None`` is one batch.
    what : str
        Name of the argument, for error messages.
    """

    def __init__(self, data: object, *, batch_size: int | None = None, what: str = "data") -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidParameterError(
                f"The 'batch_size' parameter must be a positive int or None. Got {batch_size!r} instead."
            )
        if isinstance(data, Batches):
            self.__dict__.update(data.__dict__)
            return
        self.what = what
        self.batch_size = batch_size
        self._tensors: tuple[Tensor, Tensor | None] | None = None
        self._batches: Iterable | None = None
        if isinstance(data, Tensor):
            self._tensors = (data, None)
        elif _is_pair(data):
            self._tensors = (data[0], data[1])
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
            self._batches = list(data) if iter(data) is data else data
        else:
            raise InvalidParameterError(
                f"The {what!r} parameter must be a tensor of inputs, a tuple (inputs, targets) of tensors "
                f"with the same first dimension, or an iterable of such batches (e.g. a DataLoader). "
                f"Got {type(data).__name__} instead."
            )

    def __iter__(self) -> Iterator[Batch]:
        if self._tensors is not None:
            x, y = self._tensors
            step = self.batch_size or max(len(x), 1)
            for start in range(0, len(x), step):
                yield x[start : start + step], None if y is None else y[start : start + step]
            return
        assert self._batches is not None
        for i, batch in enumerate(self._batches):
            yield self._split(batch, i)

    def _split(self, batch: object, index: int) -> Batch:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, Sequence) and len(batch) >= 1 and isinstance(batch[0], Tensor):
            target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
            return batch[0], target
        raise InvalidParameterError(
            f"Batch {index} of {self.what!r} must be a tensor of inputs or a sequence (inputs, targets, "
            f"...) of tensors. Got {type(batch).__name__} instead."
        )

    def first_inputs(self) -> Tensor:
        """The inputs of the first batch (raises when the data is empty)."""
        for x, _ in self:
            return x
        raise InvalidParameterError(f"The {self.what!r} parameter holds no batches; pass at least one.")


def batchnorm_modules(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{name: module}`` of every BatchNorm layer that tracks running statistics."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@contextmanager
def eval_mode(module: nn.Module, *, train: Iterable[nn.Module] = ()) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (the modules in ``train`` in train mode), then restore every flag."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        for m in train:
            m.train()
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
