"""Score state dicts of one module on fixed data: one at a time, or many in one batched pass.

The batched pass stacks the floating parameters and buffers of K models along a new first
dimension and runs ``torch.vmap(torch.func.functional_call(module, ...))`` over it, so every batch
of data goes through all K models at once (one batched matmul per layer instead of K small ones).
K is cut into chunks so that the stacked parameters plus an estimate of the activations stay within
``max_bytes``. With ``vectorize=False`` (the ``"auto"`` choice for convolutional modules on the
CPU) the K models of a chunk run one after the other on each batch instead. The module itself is
never modified: its training flags are switched to eval for the pass and restored, and its own
tensors are replaced by the given ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from weightlens._progress import bar
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.io import load
from weightlens.linalg import resolve_device
from weightlens.lmc._data import Batches, eval_mode
from weightlens.lmc._states import Endpoints

__all__ = ["DEFAULT_SPLIT", "Evaluator"]

DEFAULT_SPLIT = "default"
"""Split name used when ``data`` (or a plain evaluate callable) has a single split."""

Metrics = dict[str, float]
SplitArrays = dict[str, dict[str, np.ndarray]]


def _listing(keys: Sequence[str], shown: int = 5) -> str:
    keys = sorted(keys)
    text = ", ".join(repr(k) for k in keys[:shown])
    return (text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")) or "none"


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(2**28, free // 4)
    return 2**30


def _resolve_vectorize(vectorize: bool | str, module: nn.Module, device: torch.device) -> bool:
    if isinstance(vectorize, bool):
        return vectorize
    if vectorize != "auto":
        raise InvalidParameterError(
            f"The 'vectorize' parameter must be True, False or 'auto'. Got {vectorize!r} instead."
        )
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    return not (device.type == "cpu" and has_conv)


class Evaluator:
    """Mean loss and accuracy of state dicts of ``module`` on fixed data.

    Parameters
    ----------
    module : nn.Module
        Architecture template; its ``state_dict`` keys are the keys every evaluated state must have.
    data : data or dict of data
        A tuple ``(inputs, targets)`` of tensors, or an iterable of such batches (e.g. a ``DataLoader``);
        a dict ``{split: data}`` scores every split.
    loss_fn : callable, default=F.cross_entropy
        ``loss_fn(outputs, targets) -> scalar``, the *mean* over the batch; the reported loss is
        the batch-size-weighted mean over batches.
    batch_size : int, optional
        Rows per batch for tensor data (``None``: the whole split in one batch).
    device : str or torch.device, default="auto"
        Where to compute (see :func:`weightlens.linalg.resolve_device`).
    max_bytes : int, optional
        Memory budget of one batched pass (stacked parameters plus estimated activations).
        Default: 1 GiB on the CPU, a quarter of the free memory on a GPU.
    vectorize : bool or "auto", default="auto"
        Run the K stacked models of a pass under ``vmap`` (True) or one after the other on each
        batch (False). ``"auto"`` vectorizes except for convolutional modules on the CPU, where
        ``vmap`` turns convolutions into grouped ones that ran ~1.8x slower than a loop
        (``benchmarks/bench_lmc.py``); MLPs ran ~1.2x faster batched on the CPU.

    Notes
    -----
    Accuracy is the fraction of ``outputs.argmax(-1) == targets`` when targets are integers with
    the shape of ``outputs[..., 0]``; otherwise it is NaN.

    Examples
    --------
    >>> ev = Evaluator(module, {"train": (x_tr, y_tr), "test": (x_te, y_te)})  # doctest: +SKIP
    >>> ev(state_dict)["test"]["loss"]                                          # doctest: +SKIP
    """

    def __init__(
        self,
        module: nn.Module,
        data: object,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        *,
        batch_size: int | None = None,
        device: str | torch.device = "auto",
        max_bytes: int | None = None,
        vectorize: bool | str = "auto",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise InvalidParameterError(
                f"The 'module' parameter must be a torch.nn.Module. Got {type(module).__name__} instead."
            )
        if not callable(loss_fn):
            raise InvalidParameterError(f"The 'loss_fn' parameter must be callable. Got {loss_fn!r} instead.")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise InvalidParameterError(
                f"The 'max_bytes' parameter must be a positive int or None. Got {max_bytes!r} instead."
            )
        self.module = module
        self.loss_fn = loss_fn
        self.device = resolve_device(device)
        self.max_bytes = max_bytes if max_bytes is not None else _default_budget(self.device)
        self.vectorize = _resolve_vectorize(vectorize, module, self.device)
        self.single = not isinstance(data, Mapping)
        raw = {DEFAULT_SPLIT: data} if self.single else dict(data)
        if not raw:
            raise InvalidParameterError("The 'data' parameter is an empty dict; give at least one split.")
        self.data = {s: Batches(d, batch_size=batch_size, what=f"data[{s!r}]") for s, d in raw.items()}
        self._template = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
        named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        self._extra = {k: v.detach().to(self.device) for k, v in named.items() if k not in self._template}
        self._activation_bytes: int | None = None
        self._vmap_loss: bool | None = None  # unknown until a batched loss is first tried

    @property
    def splits(self) -> list[str]:
        """Names of the data splits (``["default"]`` for single data)."""
        return list(self.data)

    def __repr__(self) -> str:
        return (f"Evaluator(module={type(self.module).__name__}, splits={self.splits}, "
                f"device={str(self.device)!r}, max_bytes={self.max_bytes}, vectorize={self.vectorize})")

    # ------------------------------------------------------------------ validation
    def _check_keys(self, keys: Sequence[str], what: str) -> None:
        given = set(keys)
        missing = [k for k in self._template if k not in given]
        extra = [k for k in keys if k not in self._template]
        if missing or extra:
            raise KeyMismatchError(
                f"{what} does not match the evaluator's module {type(self.module).__name__}: missing "
                f"keys {_listing(missing)}; unexpected keys {_listing(extra)}. Pass a state dict of this "
                "architecture (the keys of module.state_dict())."
            )

    def _cast(self, key: str, tensor: Tensor, what: str, batched: bool = False) -> Tensor:
        ref = self._template[key]
        shape = tuple(tensor.shape[1:] if batched else tensor.shape)
        if shape != tuple(ref.shape):
            raise ShapeMismatchError(
                f"Tensor {key!r} of {what} has shape {shape}, expected {tuple(ref.shape)} for the "
                f"evaluator's module. Use a checkpoint of the same width and architecture."
            )
        dtype = ref.dtype if ref.is_floating_point() else tensor.dtype
        return tensor.detach().to(device=self.device, dtype=dtype)

    def prepare(self, state_dict: Mapping[str, Tensor], what: str = "state dict") -> dict[str, Tensor]:
        """Checked tensors on the compute device, in the module's dtypes, ready for functional_call."""
        self._check_keys(list(state_dict.keys()), what)
        out = {k: self._cast(k, torch.as_tensor(state_dict[k]), what) for k in self._template}
        return {**out, **self._extra}

    # ------------------------------------------------------------------ scoring
    def _score(self, forward: Callable[[Tensor], Tensor], batches: Batches, k: int) -> dict[str, np.ndarray]:
        """Weighted mean loss and accuracy of K stacked models; ``forward(x) -> (K, B, ...)``."""
        loss_sum, correct = np.zeros(k), np.zeros(k)
        rows = count = 0
        has_accuracy = True
        for x, y in batches:
            if y is None:
                raise InvalidParameterError(
                    f"{batches.what} has no targets; evaluation needs (inputs, targets) batches."
                )
            x, y = x.to(self.device), y.to(self.device)
            out = forward(x)
            loss_sum += self._losses(out, y) * len(x)
            rows += len(x)
            has_accuracy = has_accuracy and not y.is_floating_point() and tuple(out.shape[1:-1]) == tuple(y.shape)
            if has_accuracy:
                correct += (out.argmax(-1) == y).flatten(1).sum(1).double().cpu().numpy()
                count += y.numel()
        if rows == 0:
            raise InvalidParameterError(f"{batches.what} holds no batches; pass at least one.")
        accuracy = correct / count if has_accuracy and count else np.full(k, np.nan)
        return {"loss": loss_sum / rows, "accuracy": accuracy}

    def _losses(self, out: Tensor, y: Tensor) -> np.ndarray:
        """``loss_fn`` of each of the K stacked outputs: one vmapped call, or a loop if that fails."""
        if out.shape[0] > 1 and self._vmap_loss is not False:
            try:
                values = vmap(self.loss_fn, in_dims=(0, None))(out, y)
                self._vmap_loss = True
                return values.double().cpu().numpy().reshape(-1)
            except (RuntimeError, NotImplementedError):  # a loss vmap cannot trace: loop instead
                if self._vmap_loss:
                    raise
                self._vmap_loss = False
        return np.array([float(self.loss_fn(out[i], y)) for i in range(out.shape[0])])

    def __call__(self, state_dict: object) -> Metrics | dict[str, Metrics]:
        """Score one state dict or checkpoint source: ``{"loss", "accuracy"}`` (``{split: {...}}`` for dict data)."""
        params = self.prepare(state_dict if isinstance(state_dict, Mapping) else load(state_dict))

        def forward(x: Tensor) -> Tensor:
            return functional_call(self.module, params, (x,)).unsqueeze(0)

        with torch.no_grad(), eval_mode(self.module):
            result = {s: self._score(forward, b, 1) for s, b in self.data.items()}
        metrics = {s: {m: float(v[0]) for m, v in r.items()} for s, r in result.items()}
        return metrics[DEFAULT_SPLIT] if self.single else metrics

    # ------------------------------------------------------------------ batched
    def _stacked_forward(self, stacked: dict[str, Tensor], fixed: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        def one(params: dict[str, Tensor], rest: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.module, {**params, **rest}, (x,))

        if self.vectorize:
            batched = vmap(one, in_dims=(0, None, None))
            return lambda x: batched(stacked, fixed, x)
        k = len(next(iter(stacked.values())))
        return lambda x: torch.stack([one({n: v[i] for n, v in stacked.items()}, fixed, x) for i in range(k)])

    def _measure_activations(self, params: dict[str, Tensor]) -> int:
        """Bytes of all leaf-module outputs of one model on the first batch of each split (max)."""
        total = [0]

        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, Tensor):
                total[0] += out.numel() * out.element_size()

        leaves = [m for m in self.module.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        best = 0
        try:
            with torch.no_grad(), eval_mode(self.module):
                for batches in self.data.values():
                    total[0] = 0
                    functional_call(self.module, params, (batches.first_inputs().to(self.device),))
                    best = max(best, total[0])
        finally:
            for h in handles:
                h.remove()
        return best

    def chunk_size(self, params: dict[str, Tensor]) -> int:
        """How many models one batched pass may stack within ``max_bytes`` (at least 1)."""
        if self._activation_bytes is None:
            self._activation_bytes = self._measure_activations(params)
        per_model = sum(v.numel() * v.element_size() for v in params.values() if v.is_floating_point())
        return max(1, self.max_bytes // max(1, per_model + self._activation_bytes))

    def _run(self, k: int, make: Callable[[int, int], dict[str, Tensor]], fixed: dict[str, Tensor],
             chunk: int, progress: bool | None) -> SplitArrays:
        parts: list[dict[str, dict[str, np.ndarray]]] = []
        starts = range(0, k, chunk)
        with torch.no_grad(), eval_mode(self.module):
            for start in bar(starts, progress=progress if len(starts) > 1 else False, desc="lmc", unit="chunk"):
                stop = min(k, start + chunk)
                forward = self._stacked_forward(make(start, stop), fixed)
                parts.append({s: self._score(forward, b, stop - start) for s, b in self.data.items()})
        return {s: {m: np.concatenate([p[s][m] for p in parts]) for m in parts[0][s]} for s in self.data}

    def evaluate_many(self, states: Sequence[Mapping[str, Tensor]], *, progress: bool | None = None) -> SplitArrays:
        """Score K state dicts in batched passes: ``{split: {"loss": (K,), "accuracy": (K,)}}``.

        Non-floating tensors (e.g. ``num_batches_tracked``) are taken from the first state.
        """
        if not states:
            raise InvalidParameterError("The 'states' parameter is empty; pass at least one state dict.")
        first = self.prepare(states[0], "state 0")
        floats = [k for k, v in first.items() if v.is_floating_point() and k in self._template]
        fixed = {k: v for k, v in first.items() if k not in floats}

        def make(start: int, stop: int) -> dict[str, Tensor]:
            prepared = [first if i == 0 else self.prepare(states[i], f"state {i}") for i in range(start, stop)]
            return {k: torch.stack([p[k] for p in prepared]) for k in floats}

        return self._run(len(states), make, fixed, self.chunk_size(first), progress)

    def evaluate_weights(self, endpoints: Endpoints, weights: np.ndarray, *, progress: bool | None = None) -> SplitArrays:
        """Score the K combinations ``sum_i weights[k, i] * theta_i`` of stacked endpoints, batched."""
        self._check_keys(endpoints.keys, f"endpoint {endpoints.names[0]!r}")
        endpoints.to(self.device)
        first = self.prepare(endpoints.state(0), f"endpoint {endpoints.names[0]!r}")
        fixed = {k: v for k, v in first.items() if k not in endpoints.stacked}

        def make(start: int, stop: int) -> dict[str, Tensor]:
            combined = endpoints.combine_many(weights[start:stop])
            return {k: self._cast(k, v, f"endpoint {endpoints.names[0]!r}", batched=True)
                    for k, v in combined.items()}

        return self._run(len(weights), make, fixed, self.chunk_size(first), progress)
