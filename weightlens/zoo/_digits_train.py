"""Model side of the digits zoos: the MLPs, a seeded training loop, linear probes and scoring."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from weightlens.errors import KeyMismatchError, ShapeMismatchError
from weightlens.linalg import torch_threads

BUILD_THREADS = 1
"""Torch intra-op threads while building: a fixed count keeps builds bitwise reproducible."""


class MLP(nn.Module):
    """``64 -> width -> width -> 10`` with ReLU; keys ``fc1/fc2/fc3.weight`` and ``.bias``."""

    def __init__(self, width: int, n_in: int = 64, n_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Body(nn.Module):
    """Feature extractor ``64 -> width -> width`` with ReLU after both layers; keys ``fc1``, ``fc2``."""

    def __init__(self, width: int = 512, n_in: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))))


def build_threads(n: int = BUILD_THREADS) -> AbstractContextManager[int]:
    """Run the block with ``n`` torch threads (the builds' fixed count), then restore the caller's."""
    return torch_threads(n)


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with its default init drawn from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def train(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[nn.Parameter],
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[], None] | None = None,
) -> None:
    """Minimize mean cross-entropy with Adam over mini-batches shuffled by a generator seeded ``seed``."""
    x, y = data
    opt = torch.optim.Adam(list(params), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x[idx]), y[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch()


def fit_head(
    features: torch.Tensor, y: torch.Tensor, *, n_out: int = 10, weight_decay: float = 3e-2
) -> nn.Linear:
    """Linear probe: L2-regularized multinomial logistic regression by full-batch L-BFGS from zero.

    Minimizes ``mean CE + weight_decay / 2 * ||W||^2`` (bias not penalized); deterministic.
    """
    head = nn.Linear(features.shape[1], n_out, device="meta").to_empty(device="cpu")  # no RNG use
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(features), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.requires_grad_(False)
    return head


def score(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"accuracy", "loss"}``: fraction of correct argmax and mean cross-entropy."""
    return {
        "accuracy": float((logits.argmax(dim=1) == y).double().mean()),
        "loss": float(F.cross_entropy(logits.double(), y)),
    }


def checked_params(
    state_dict: Mapping[str, torch.Tensor], module: nn.Module, what: str
) -> dict[str, torch.Tensor]:
    """The module's parameters taken from ``state_dict`` as float32, with clear key and shape errors."""
    expected = dict(module.named_parameters())
    given = set(state_dict.keys())
    missing = [k for k in expected if k not in given]
    extra = sorted(given - set(expected))
    if missing or extra:
        raise KeyMismatchError(
            f"{what} expects keys {list(expected)}; missing {missing}, unexpected {extra}. "
            "Pass a state dict of this zoo's architecture (e.g. wl.load of one of its files)."
        )
    out = {}
    for key, param in expected.items():
        tensor = torch.as_tensor(state_dict[key])
        if tuple(tensor.shape) != tuple(param.shape):
            raise ShapeMismatchError(
                f"{what}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(param.shape)}. Use a state dict of the same width."
            )
        out[key] = tensor.detach().to(device="cpu", dtype=torch.float32)
    return out


@torch.no_grad()
def features_of(module: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Forward ``x`` through ``module`` with ``params`` substituted (the module is left untouched)."""
    return torch.func.functional_call(module, dict(params), (x,))


def state_dict_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous float32 copies of a module's parameters (what the zoo files hold)."""
    return {k: v.detach().clone().contiguous() for k, v in module.named_parameters()}
