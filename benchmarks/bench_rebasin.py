"""Benchmark: weight matching of an MLP 784-2048-2048-10 pair, weightlens vs a plain scipy loop.

Both models are trained briefly (Adam, a few epochs) from different seeds on sklearn's digits
upsampled to 28x28, so the weights have trained structure without any download. The baseline is
the straightforward port of Git Re-Basin's ``weight_matching.py`` to NumPy: every visit of a
permutation rebuilds all its cost terms from scratch, permuting whole tensors with ``np.take``,
then solves the LAP with ``scipy.optimize.linear_sum_assignment``. Both use the same seed and the
same random visiting order, so they should reach the same permutations; the script checks that and
prints the time ratio (best of ``--repeat`` runs each, same process).

Run: ``python benchmarks/bench_rebasin.py [--width 2048] [--epochs 3] [--repeat 2] [--device cuda]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from weightlens.rebasin import matching, mlp_spec, weight_matching


def digits_784() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).reshape(len(x), -1)
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(d.target)


def trained_mlp(width: int, seed: int, epochs: int, data) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- baseline (plain scipy loop)


def baseline_weight_matching(spec, a, b, *, seed: int = 0, max_iter: int = 100):
    """Git Re-Basin's ``weight_matching`` in NumPy: from-scratch cost matrices, ``np.take`` per visit."""
    a = {k: v.double().numpy() for k, v in a.items()}
    b = {k: v.double().numpy() for k, v in b.items()}
    axes = {k: tuple(None if ax is None else ax[0].name for ax in v) for k, v in spec.axes.items()}
    names = spec.units
    sizes = {p: a[k].shape[i] for p, [(k, i), *_] in spec.perm_to_axes.items()}
    perm = {p: np.arange(n) for p, n in sizes.items()}

    def permuted(key: str, except_axis: int) -> np.ndarray:
        w = b[key]
        for axis, p in enumerate(axes[key]):
            if axis != except_axis and p is not None:
                w = np.take(w, perm[p], axis=axis)
        return w

    rng = np.random.default_rng(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for p_ix in rng.permutation(len(names)):
            p = names[p_ix]
            n = sizes[p]
            cost = np.zeros((n, n))
            for key, axis in spec.perm_to_axes[p]:
                w_a = np.moveaxis(a[key], axis, 0).reshape((n, -1))
                w_b = np.moveaxis(permuted(key, axis), axis, 0).reshape((n, -1))
                cost += w_a @ w_b.T
            _, ci = linear_sum_assignment(cost, maximize=True)
            old = np.vdot(cost, np.eye(n)[perm[p]])
            new = np.vdot(cost, np.eye(n)[ci, :])
            progress = progress or new > old + 1e-12
            perm[p] = ci
        if not progress:
            break
    return {p: torch.from_numpy(v) for p, v in perm.items()}, sweeps


# ---------------------------------------------------------------------------------------- main


def best_of(repeat: int, fn):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default=None, help="cost matrices on this device (default: CPU float64)")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    data = digits_784()
    t0 = time.perf_counter()
    a, b = (trained_mlp(args.width, s, args.epochs, data) for s in (1, 2))
    width, took = args.width, time.perf_counter() - t0
    print(f"MLP 784-{width}-{width}-10 pair trained {args.epochs} epochs in {took:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    spec = mlp_spec(a)

    calls = {"lap": 0}
    real_lap = matching._lap

    def counting_lap(*lap_args, **lap_kwargs):
        calls["lap"] += 1
        return real_lap(*lap_args, **lap_kwargs)

    matching._lap = counting_lap
    try:
        t_wl, found = best_of(args.repeat, lambda: weight_matching(a, b, spec, seed=0, device=args.device))
    finally:
        matching._lap = real_lap
    t_base, (base_perms, base_sweeps) = best_of(args.repeat, lambda: baseline_weight_matching(spec, a, b, seed=0))

    same = all(torch.equal(found.perms[p], base_perms[p]) for p in base_perms)
    sweeps = len(found.objective_history) - 1
    print(f"weightlens weight_matching : {t_wl:7.2f} s  ({sweeps} sweeps, {calls['lap'] // args.repeat} LAPs solved "
          f"of {sweeps * len(spec.units)} visits; objective {found.objective_history[0]:.6g} -> {found.objective:.6g})")
    print(f"plain scipy loop (baseline): {t_base:7.2f} s  ({base_sweeps} sweeps, {base_sweeps * len(spec.units)} LAPs)")
    print(f"same permutations: {same}")
    print(f"ratio baseline / weightlens: {t_base / t_wl:.2f}x")


if __name__ == "__main__":
    main()
