"""Linear assignment (maximum-weight perfect matching of a square matrix) for weight matching.

Two solvers, one answer format (the column of each row):

* ``"scipy"`` (default): ``scipy.optimize.linear_sum_assignment`` (a shortest augmenting path
  solver), exact, on the CPU in float64.
* ``"auction"``: Bertsekas' auction algorithm with epsilon-scaling in torch, so it runs where the
  cost matrix lives (a GPU for wide layers). Every unassigned row bids at once (Jacobi bidding,
  vectorised); each phase divides epsilon by ``factor`` down to ``eps_rel * range / n``, so the
  assignment's value is within ``eps_rel * range`` of the optimum (``range`` = max - min of the
  costs), and exactly optimal for integer costs once ``eps_rel * range < 1``.
  Float64 throughout.

Which one wins where is measured by ``benchmarks/bench_lap.py``; on the 2-core CPU the SciPy solver
is 6-30x faster (n = 256-2048), so it stays the default (GPU timings: see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import numpy as np
import torch

from weightlens.errors import InvalidParameterError

__all__ = ["LAP_SOLVERS", "auction", "solve"]

LAP_SOLVERS = ("scipy", "auction")


def solve(cost: np.ndarray | torch.Tensor, solver: str = "scipy") -> np.ndarray:
    """Column of each row in a maximum-weight assignment of a square matrix (int64 NumPy array).

    Parameters
    ----------
    cost : (n, n) array or tensor; an auction runs on the tensor's device.
    solver : ``"scipy"`` or ``"auction"`` (see the module docstring).
    """
    check_solver(solver)
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n:
        raise InvalidParameterError(f"A linear assignment needs a square matrix; got shape {tuple(cost.shape)}.")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if solver == "auction":
        benefit = cost if isinstance(cost, torch.Tensor) else torch.from_numpy(np.asarray(cost))
        return auction(benefit).cpu().numpy()
    from scipy.optimize import linear_sum_assignment  # imported here: scipy.optimize is slow to import

    dense = cost.detach().to("cpu", torch.float64).numpy() if isinstance(cost, torch.Tensor) else cost
    return linear_sum_assignment(dense, maximize=True)[1].astype(np.int64)


def check_solver(solver: object) -> None:
    """Raise a clear error for an unknown solver name."""
    if solver not in LAP_SOLVERS:
        raise InvalidParameterError(
            f"The 'lap' parameter must be one of {', '.join(map(repr, LAP_SOLVERS))}. Got {solver!r} instead."
        )


def auction(benefit: torch.Tensor, *, eps_rel: float = 1e-9, factor: float = 5.0) -> torch.Tensor:
    """Maximum-weight assignment by the auction algorithm with epsilon-scaling (see module docstring).

    Returns the column of each row (int64, on ``benefit``'s device).
    """
    c = benefit.detach().to(torch.float64)
    n = c.shape[0]
    if n and not bool(torch.isfinite(c).all()):
        raise InvalidParameterError("auction(): the cost matrix holds NaN or Inf values.")
    c = c - c.min()
    span = float(c.max()) if n else 0.0
    if span == 0.0 or n == 1:
        return torch.arange(n, device=c.device)
    dev = c.device
    price = torch.zeros(n, dtype=torch.float64, device=dev)
    # a bid must move a price by more than its rounding error, or a phase could stall
    eps, eps_min = span / 4.0, max(span * eps_rel / n, span * 64 * torch.finfo(torch.float64).eps)
    while True:
        col = _auction_phase(c, price, eps)  # prices carry over between phases
        if eps <= eps_min:
            return col
        eps = max(eps / factor, eps_min)


def _auction_phase(c: torch.Tensor, price: torch.Tensor, eps: float) -> torch.Tensor:
    """One epsilon phase from an empty assignment; updates ``price`` in place, returns row -> column."""
    n, dev = c.shape[0], c.device
    owner = torch.full((n,), -1, dtype=torch.long, device=dev)  # column -> row
    col = torch.full((n,), -1, dtype=torch.long, device=dev)  # row -> column
    none = torch.full((n,), n, dtype=torch.long, device=dev)
    while True:
        free = torch.nonzero(col < 0).squeeze(1)
        if free.numel() == 0:
            return col
        top = torch.topk(c[free] - price, 2, dim=1)
        want = top.indices[:, 0]
        bid = price[want] + (top.values[:, 0] - top.values[:, 1]) + eps
        best = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev)
        best.scatter_reduce_(0, want, bid, reduce="amax")
        winner = none.clone()  # the lowest row among the highest bidders of each column
        top_bid = bid == best[want]
        winner.scatter_reduce_(0, want[top_bid], free[top_bid], reduce="amin")
        taken = torch.nonzero(winner < n).squeeze(1)
        rows, previous = winner[taken], owner[taken]
        col[previous[previous >= 0]] = -1
        owner[taken], col[rows], price[taken] = rows, taken, best[taken]
