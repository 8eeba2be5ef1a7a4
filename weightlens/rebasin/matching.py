"""Weight matching (Git Re-Basin, Algorithm 1), activation matching and MergeMany.

Weight matching maximises ``sum_key <a[key], pi(b)[key]>`` over the permutations of a spec by
coordinate descent: each sweep visits every permutation in a new random order and solves its linear
assignment problem (LAP) with all other permutations fixed. Cost matrices are built with torch (on a
GPU when ``device`` names one); LAPs are solved on the CPU in float64 with
``scipy.optimize.linear_sum_assignment``. Three exact shortcuts skip work without changing the
result: a permutation whose neighbours have not changed since its last solve is not solved again; a
LAP whose current assignment already takes every row's maximum is not run; and each tensor's share
of a cost matrix is cached and corrected by a low-rank product when only a few entries of the other
permutation on that tensor changed (``weightlens.rebasin._cost``).

Head groups are solved jointly: for every pair of (key/value) heads the within-head LAPs for Q/K and
V/O are solved and scored, then a head-level LAP picks the head permutation (exact for plain
multi-head attention; with GQA the query heads inside a group are found by alternating with the
within-head LAPs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from weightlens._options import resolve_options
from weightlens._progress import bar, finish
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.rebasin._cost import Problem, as_state_dict, work_device
from weightlens.rebasin.lap import check_solver
from weightlens.rebasin.lap import solve as solve_lap
from weightlens.rebasin.spec import (
    VIEWS,
    HeadPerm,
    Permutations,
    PermutationSpec,
    Seg,
    head_dims,
)

__all__ = [
    "ActivationOptions",
    "MatchingOptions",
    "MergeManyResult",
    "activation_matching",
    "merge_many",
    "weight_matching",
]

StateDict = Mapping[str, torch.Tensor]


def _lap(cost: np.ndarray, solver: str = "scipy", device: torch.device | None = None) -> np.ndarray:
    """Column of each row in a maximum-weight assignment of a square float64 matrix.

    ``solver="auction"`` runs on ``device`` (see :mod:`weightlens.rebasin.lap`).
    """
    if solver == "auction" and device is not None and cost.size:
        return solve_lap(torch.from_numpy(cost).to(device), solver)
    return solve_lap(cost, solver)


def _gain(new: float, old: float, tol: float) -> bool:
    return new - old > tol * max(abs(old), abs(new))


def _solve_plain(problem: Problem, name: str, perms: dict[str, torch.Tensor], tol: float, solver: str) -> bool:
    c = problem.cost(name, perms)
    rows = np.arange(c.shape[0])
    cur = perms[name].numpy()
    if c.size == 0 or np.all(c[rows, cur] >= c.max(axis=1)):
        return False  # every row already takes its maximum: the current assignment is optimal
    col = _lap(c, solver, problem.device)
    if _gain(float(c[rows, col].sum()), float(c[rows, cur].sum()), tol):
        perms[name] = torch.from_numpy(col)
        return True
    return False


def _head_pair(q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray, rope: bool):
    """Best within-head assignment of one (key/value) head pair: ``(score, qhead, qk, vo)``.

    ``q``: (r, d, r, d), ``k``: (d, d), ``v``: (e, e), ``o``: (r, e, r, e) blocks of the view costs.
    """
    r, d, e = q.shape[0], k.shape[0], v.shape[0]
    tau, ar = np.arange(r), np.arange(r)
    for it in range(20):
        m_qk = k + q[ar, :, tau, :].sum(0)
        s_qk = np.arange(d) if rope else _lap(m_qk)
        m_vo = v + o[ar, :, tau, :].sum(0)
        s_vo = _lap(m_vo)
        if r == 1 or it == 19:
            break
        heads = q[:, np.arange(d), :, s_qk].sum(0) + o[:, np.arange(e), :, s_vo].sum(0)
        new_tau = _lap(heads)
        if np.array_equal(new_tau, tau):
            break
        tau = new_tau
    score = m_qk[np.arange(d), s_qk].sum() + m_vo[np.arange(e), s_vo].sum()
    return float(score), tau, s_qk, s_vo


def _solve_heads(
    problem: Problem, name: str, perms: dict[str, torch.Tensor], heads: dict[str, HeadPerm], tol: float
) -> bool:
    group = problem.spec.heads[name]
    n_kv, r = group.kv_heads, group.q_per_group
    d, e = head_dims(problem.spec, problem.sizes, name)
    views = {p: group.view(p) for p in VIEWS}
    c = {p: problem.cost(v, perms) for p, v in views.items()}
    q = (c["q"] if c["q"].size else np.zeros((n_kv * r * d,) * 2)).reshape(n_kv, r, d, n_kv, r, d)
    k = (c["k"] if c["k"].size else np.zeros((n_kv * d,) * 2)).reshape(n_kv, d, n_kv, d)
    v = (c["v"] if c["v"].size else np.zeros((n_kv * e,) * 2)).reshape(n_kv, e, n_kv, e)
    o = (c["o"] if c["o"].size else np.zeros((n_kv * r * e,) * 2)).reshape(n_kv, r, e, n_kv, r, e)
    score = np.zeros((n_kv, n_kv))
    parts = {}
    for ga in range(n_kv):
        for gb in range(n_kv):
            score[ga, gb], *parts[ga, gb] = _head_pair(q[ga, :, :, gb], k[ga, :, gb], v[ga, :, gb],
                                                      o[ga, :, :, gb], group.rope)
    grp = _lap(score)
    chosen = [parts[ga, gb] for ga, gb in enumerate(grp)]
    new = HeadPerm(torch.from_numpy(grp), *(torch.from_numpy(np.stack([p[j] for p in chosen])) for j in range(3)))

    def value(hp: HeadPerm) -> float:
        flat = hp.views()
        return sum(float(c[p][np.arange(c[p].shape[0]), flat[p].numpy()].sum()) for p in VIEWS if c[p].size)

    if _gain(value(new), value(heads[name]), tol):
        heads[name] = new
        perms.update({views[p]: idx for p, idx in new.views().items()})
        return True
    return False


def _descend(problem: Problem, start: Permutations, *, seed: int, max_iter: int, tol: float,
             progress: bool | None, solver: str = "scipy") -> Permutations:
    perms, heads = dict(start.perms), dict(start.heads)
    units = problem.spec.units
    rng = np.random.default_rng(seed)
    version = dict.fromkeys(units, 0)
    solved_with: dict[str, tuple[int, ...]] = {}
    history = [problem.objective(perms)]
    sweeps = bar(total=max_iter, progress=progress, desc="weight matching", unit="sweep")
    for _ in range(max_iter):
        sweeps.update(1)
        moved = False
        for unit in (units[i] for i in rng.permutation(len(units))):
            snapshot = tuple(version[d] for d in problem.deps[unit])
            if solved_with.get(unit) == snapshot:
                continue  # same neighbours as at its last solve: the same LAP, no progress
            solved_with[unit] = snapshot
            if unit in problem.spec.heads:
                changed = _solve_heads(problem, unit, perms, heads, tol)
            else:
                changed = _solve_plain(problem, unit, perms, tol, solver)
            if changed:
                version[unit] += 1
                moved = True
        history.append(problem.objective(perms))
        if not moved:
            break
    finish(sweeps)
    plain = {u: perms[u] for u in units if u not in problem.spec.heads}
    return Permutations.from_parts(problem.spec, plain, heads, history)


@dataclass(frozen=True)
class MatchingOptions:
    """How :func:`weight_matching` searches (all have defaults).

    Attributes
    ----------
    seed : seeds the random order of each sweep (0).
    max_iter : most sweeps (100); matching stops earlier when a sweep changes nothing.
    tol : relative progress a LAP must make to be accepted (1e-12).
    lap : LAP solver of the plain permutations, ``"scipy"`` (default; CPU, exact) or ``"auction"``
        (torch, on ``device``; see :mod:`weightlens.rebasin.lap`). Head groups' small LAPs always use SciPy.
    device : where cost matrices are built (``None``, the default: CPU, float64; a GPU uses float32).
    progress : a bar over sweeps: None (default) follows ``weightlens.config.progress``, True or False.
    """

    seed: int = 0
    max_iter: int = 100
    tol: float = 1e-12
    lap: str = "scipy"
    device: str | torch.device | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int | np.integer):
            raise InvalidParameterError(f"The 'seed' parameter must be an int. Got {self.seed!r} instead.")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise InvalidParameterError(
                f"The 'max_iter' parameter must be an int >= 1. Got {self.max_iter!r} instead."
            )
        if not (isinstance(self.tol, float | int) and self.tol >= 0):
            raise InvalidParameterError(f"The 'tol' parameter must be a float >= 0. Got {self.tol!r} instead.")
        check_solver(self.lap)


def _check_init(init: Permutations | None, spec: PermutationSpec, sd: StateDict) -> Permutations:
    if init is None:
        return Permutations.identity(spec, sd)
    if not isinstance(init, Permutations):
        raise InvalidParameterError(f"The 'init' parameter must be a Permutations or None. Got {type(init)}.")
    ref = Permutations.identity(spec, sd)
    for name, p in ref.perms.items():
        if name not in init.perms or init.perms[name].numel() != p.numel():
            raise InvalidParameterError(
                f"init lacks permutation {name!r} of size {p.numel()} that the spec needs; pass "
                f"permutations found with the same spec and model sizes."
            )
    plain = {n: init.perms[n] for n in spec.units if n not in spec.heads}
    return Permutations.from_parts(spec, plain, {n: init.heads[n] for n in spec.heads})


def weight_matching(
    a: object,
    b: object,
    spec: PermutationSpec,
    *,
    init: Permutations | None = None,
    options: MatchingOptions | None = None,
    **overrides: Any,
) -> Permutations:
    """Permutations of ``b`` that bring it closest to ``a`` (Git Re-Basin weight matching).

    Parameters
    ----------
    a, b : checkpoint sources or ``Mapping[str, Tensor]`` with the spec's keys and equal shapes.
    spec : the permutation spec of the architecture.
    init : starting permutations (default identity), e.g. from an earlier run.
    options : a :class:`MatchingOptions`; ``**overrides`` set its fields directly: ``seed`` (0),
        ``max_iter`` (100), ``tol`` (1e-12), ``lap`` (``"scipy"`` or ``"auction"``), ``device``
        (``None``: CPU) and ``progress`` (None: auto), e.g. ``weight_matching(a, b, spec, seed=1)``.

    Returns
    -------
    Permutations
        ``.apply(b)`` permutes ``b`` into ``a``'s basis; ``.objective_history`` holds
        ``<a, pi(b)>`` at the start and after each sweep.

    Examples
    --------
    >>> import torch
    >>> spec = PermutationSpec({"w1": ("h", None), "w2": (None, "h")})
    >>> a = {"w1": torch.randn(4, 3), "w2": torch.randn(2, 4)}
    >>> p = Permutations.random(spec, a, seed=1)
    >>> found = weight_matching(a, p.apply(a), spec)
    >>> all(torch.equal(t, a[k]) for k, t in found.apply(p.apply(a)).items())
    True
    """
    opts = resolve_options(MatchingOptions, options, overrides, caller="weight_matching")
    a, b = as_state_dict(a), as_state_dict(b)
    problem = Problem(spec, a, b, opts.device)
    start = _check_init(init, spec, b)
    return _descend(problem, start, seed=int(opts.seed), max_iter=opts.max_iter, tol=float(opts.tol),
                    progress=opts.progress, solver=opts.lap)


# -------------------------------------------------------------------------------------- MergeMany


@dataclass(frozen=True, eq=False)
class MergeManyResult:
    """Outcome of :func:`merge_many`.

    Attributes
    ----------
    state_dict : the average of the permuted models (each key in the first model's dtype).
    permutations : per model, the permutations that map it into the shared basis.
    rounds : rounds of matching run.
    """

    state_dict: dict[str, torch.Tensor]
    permutations: tuple[Permutations, ...]
    rounds: int

    def __repr__(self) -> str:  # short: never the tensors
        numel = sum(t.numel() for t in self.state_dict.values())
        return (f"MergeManyResult({len(self.permutations)} models averaged, {len(self.state_dict)} keys, "
                f"{numel:,} values, {self.rounds} round(s) of matching)")


def _mean(models: Sequence[StateDict], keys: Iterable[str], skip: int | None = None) -> dict[str, torch.Tensor]:
    chosen = [m for i, m in enumerate(models) if i != skip]
    return {k: sum(m[k].double() for m in chosen) / len(chosen) for k in keys}


def merge_many(
    state_dicts: Sequence[object],
    spec: PermutationSpec,
    *,
    seed: int = 0,
    max_iter: int = 100,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    lap: str = "scipy",
) -> MergeManyResult:
    """Align N models to each other with no anchor, then average them (Git Re-Basin MergeMany).

    Until a round changes nothing (or ``max_iter`` rounds): for each model in a new random order,
    weight-match it to the mean of the other (currently permuted) models. Float keys are averaged;
    other keys are taken from the first model. BatchNorm statistics of the average are not those of
    the averaged network: reset them on data before use.

    Parameters
    ----------
    state_dicts : two or more checkpoint sources of one architecture.
    spec : the permutation spec of the architecture.
    seed : seeds the model order and each weight matching.
    max_iter : most rounds (and most sweeps of each weight matching).
    device : where cost matrices are built (see :func:`weight_matching`).
    progress : a bar over rounds (None: ``weightlens.config.progress`` decides).
    lap : LAP solver (see :func:`weight_matching`).
    """
    matching = MatchingOptions(seed=seed, max_iter=max_iter, lap=lap, device=device, progress=False)
    models = [as_state_dict(s) for s in state_dicts]
    if len(models) < 2:
        raise InvalidParameterError(f"merge_many needs at least 2 models. Got {len(models)}.")
    floats = [k for k in models[0] if models[0][k].is_floating_point()]
    base = [{k: m[k] for k in m} for m in models]
    perms = [Permutations.identity(spec, m) for m in base]
    current = [dict(m) for m in base]
    rng = np.random.default_rng(seed)
    rounds = bar(total=max_iter, progress=progress, desc="MergeMany", unit="round")
    done = 0
    for _ in range(max_iter):
        done += 1
        changed = False
        for i in rng.permutation(len(models)):
            mean = _mean(current, [k for k in spec.keys if k in floats], skip=int(i))
            target = {k: mean.get(k, base[i][k]) for k in spec.keys}
            found = weight_matching(target, base[i], spec, init=perms[i],
                                    options=replace(matching, seed=int(rng.integers(2**31))))
            if not found.equals(perms[i]):
                perms[i], current[i], changed = found, found.apply(base[i]), True
        rounds.update(1)
        if not changed:
            break
    finish(rounds)
    merged = _mean(current, floats)
    out = {k: (merged[k].to(models[0][k].dtype) if k in merged else models[0][k]) for k in models[0]}
    return MergeManyResult(out, tuple(perms), done)


# ------------------------------------------------------------------------------- activation matching

_CHANNEL_FIRST = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)


def _hook_sites(spec: PermutationSpec, module: torch.nn.Module,
                hooks: Mapping[str, str | Sequence[str]] | None) -> dict[str, list[str]]:
    """``{permutation: [module paths whose outputs carry its units]}``."""
    paths = dict(module.named_modules())
    unknown = sorted(set(hooks or {}) - set(spec.units))
    if unknown:
        raise InvalidParameterError(f"activation_matching: hooks name {unknown}, which are not permutations of the "
                                    f"spec ({spec.units[:6]}).")
    sites: dict[str, list[str]] = {}
    for name in spec.units:
        given = (hooks or {}).get(name)
        if given is None:
            writers = [k.rpartition(".")[0] for k, ax in spec.axes.items()
                       if k.endswith(".weight") and ax and ax[0] == (Seg(name),)]
            layer = torch.nn.Linear | torch.nn.modules.conv._ConvNd
            given = next((w for w in writers if isinstance(paths.get(w), layer)), None)
            if given is None:
                raise InvalidParameterError(
                    f"activation_matching: no Linear/Conv module writes permutation {name!r}; name the module "
                    f"whose output carries it in hooks={{{name!r}: 'module.path'}}."
                )
        sites[name] = [given] if isinstance(given, str) else list(given)
        for path in sites[name]:
            if path not in paths:
                raise KeyMismatchError(f"activation_matching: hooks name module {path!r}, which the model lacks.")
    return sites


def _batches(data: object, batch_size: int) -> Iterable[torch.Tensor]:
    """Input batches from a tensor, an ``(inputs, labels, ...)`` tuple, or an iterable of batches."""
    if isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
        data = data[0]
    if isinstance(data, torch.Tensor):
        return data.split(batch_size)
    return (batch[0] if isinstance(batch, tuple | list) else batch for batch in data)  # type: ignore[attr-defined]


class _Moments:
    """Running ``sum a b^T``, ``sum a``, ``sum a^2`` of two models' units (float64)."""

    def __init__(self, n: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.cross, self.sa, self.sb, self.qa, self.qb, self.count = z(n, n), z(n), z(n), z(n), z(n), 0

    def update(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        za, zb = za.double(), zb.double()
        self.cross.addmm_(za.T, zb)
        self.sa += za.sum(0)
        self.sb += zb.sum(0)
        self.qa += (za * za).sum(0)
        self.qb += (zb * zb).sum(0)
        self.count += za.shape[0]

    def matrix(self, correlation: str) -> np.ndarray:
        n = max(self.count, 1)
        if correlation == "moment":
            return (self.cross / n).cpu().numpy()
        ma, mb = self.sa / n, self.sb / n
        cov = self.cross / n - torch.outer(ma, mb)
        sd_a = (self.qa / n - ma * ma).clamp_min(0).sqrt()
        sd_b = (self.qb / n - mb * mb).clamp_min(0).sqrt()
        return (cov / (torch.outer(sd_a, sd_b) + 1e-12)).cpu().numpy()


def _units(out: object, n: int, mod: torch.nn.Module, path: str, name: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise InvalidParameterError(f"activation_matching: module {path!r} does not return a tensor.")
    dim = 1 if isinstance(mod, _CHANNEL_FIRST) and out.ndim > 2 else out.ndim - 1
    if out.shape[dim] != n:
        raise ShapeMismatchError(
            f"activation_matching: output of {path!r} has {out.shape[dim]} units on axis {dim}, but "
            f"permutation {name!r} has {n}. Hook a module whose output carries {name!r} (hooks=)."
        )
    return out.detach().movedim(dim, -1).reshape(-1, n)


def _collect(models: Sequence[torch.nn.Module], sites: Mapping[str, list[str]], sizes: Mapping[str, int],
             batches: Iterable[torch.Tensor], dev: torch.device) -> dict[str, _Moments]:
    """Run both models over the batches and accumulate the moments of every permutation's units."""
    outputs: list[dict[str, object]] = [{}, {}]
    handles = []
    for side, m in enumerate(models):
        for path in {p for ps in sites.values() for p in ps}:
            hook = lambda _m, _i, out, side=side, path=path: outputs[side].__setitem__(path, out)  # noqa: E731
            handles.append(m.get_submodule(path).register_forward_hook(hook))
    stats = {name: _Moments(sizes[name], dev) for name in sites}
    try:
        with torch.no_grad():
            for x in batches:
                for m in models:
                    m(x.to(dev))
                for name, paths in sites.items():
                    for p in paths:
                        mod = models[0].get_submodule(p)
                        stats[name].update(*(_units(outputs[s][p], sizes[name], mod, p, name) for s in (0, 1)))
    finally:
        for h in handles:
            h.remove()
    return stats


def _loaded(factory: Callable[[], torch.nn.Module], sd: StateDict, which: str) -> torch.nn.Module:
    module = factory()
    want, have = set(module.state_dict()), set(sd)
    if want != have:
        raise KeyMismatchError(
            f"activation_matching: the module from module_factory does not fit model {which}: missing "
            f"{sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}. Pass a factory of this architecture."
        )
    module.load_state_dict({k: sd[k] for k in sd})
    return module


@dataclass(frozen=True)
class ActivationOptions:
    """How :func:`activation_matching` runs the models and solves its LAPs (all have defaults).

    Attributes
    ----------
    batch_size : batch size when ``data`` is a tensor (500).
    device : where the models run (``None``, the default: CPU).
    lap : LAP solver, ``"scipy"`` (default) or ``"auction"`` (see :class:`MatchingOptions`).
    """

    batch_size: int = 500
    device: str | torch.device | None = None
    lap: str = "scipy"

    def __post_init__(self) -> None:
        check_solver(self.lap)
        size = self.batch_size
        if not (isinstance(size, int | np.integer) and not isinstance(size, bool) and size >= 1):
            raise InvalidParameterError(f"The 'batch_size' parameter must be an int >= 1. Got {size!r} instead.")


def activation_matching(
    a: object,
    b: object,
    spec: PermutationSpec,
    module_factory: Callable[[], torch.nn.Module],
    data: object,
    *,
    hooks: Mapping[str, str | Sequence[str]] | None = None,
    correlation: str = "moment",
    options: ActivationOptions | None = None,
    **overrides: Any,
) -> Permutations:
    """Permutations of ``b`` whose units best match ``a``'s activations on data (Git Re-Basin 9.3).

    For each permutation, activations of both models are collected with forward hooks at the module
    whose output carries its units, and one LAP maximises ``sum_i M[i, pi(i)]`` with ``M`` the
    uncentred cross-moment ``E[z_a z_b^T]`` (``correlation="moment"``) or Pearson correlation
    (``"pearson"``). Each permutation is solved on its own.

    Parameters
    ----------
    a, b : checkpoint sources or state dicts of one architecture.
    spec : plain permutations only (head groups: use :func:`weight_matching`).
    module_factory : returns a module whose ``state_dict`` keys match ``a`` and ``b``.
    data : input tensor, ``(inputs, labels)`` tuple, or an iterable of batches (a DataLoader).
    hooks : ``{permutation: module path or paths}``; default: the Linear/Conv writing it (its
        pre-activation output).
    correlation : ``"moment"`` or ``"pearson"``.
    options : an :class:`ActivationOptions`; ``**overrides`` set its fields directly:
        ``batch_size`` (500, when ``data`` is a tensor), ``device`` (where the models run;
        ``None``: CPU) and ``lap`` (see :func:`weight_matching`).

    Returns
    -------
    Permutations
        ``objective_history`` holds ``sum_perms trace(M pi)`` before and after matching.
    """
    opts = resolve_options(ActivationOptions, options, overrides, caller="activation_matching")
    if correlation not in ("moment", "pearson"):
        raise InvalidParameterError(f"The 'correlation' parameter must be 'moment' or 'pearson'. Got {correlation!r}.")
    if spec.heads:
        raise InvalidParameterError(
            f"activation_matching handles plain permutations only; the spec has head groups "
            f"{list(spec.heads)[:3]}. Use weight_matching for attention."
        )
    a, b = as_state_dict(a), as_state_dict(b)
    sizes = spec.sizes(a, name="first model (a)")
    spec.sizes(b, name="second model (b)")
    dev, _ = work_device(opts.device)
    models = [_loaded(module_factory, sd, which).to(dev).eval() for sd, which in ((a, "a"), (b, "b"))]
    sites = _hook_sites(spec, models[0], hooks)
    stats = _collect(models, sites, sizes, _batches(data, opts.batch_size), dev)
    plain, before, after = {}, 0.0, 0.0
    for name, st in stats.items():
        c = st.matrix(correlation)
        col = _lap(c, opts.lap, dev)
        plain[name] = torch.from_numpy(col)
        before += float(np.trace(c))
        after += float(c[np.arange(len(col)), col].sum())
    return Permutations.from_parts(spec, plain, {}, (before, after))
