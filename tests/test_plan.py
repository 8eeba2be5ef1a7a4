"""wl.plan: keys, shapes and bytes from the headers; the decompositions a merge really computes; refusals.

Prediction quality (time within 2x, peak RSS within 25%) is measured in ``benchmarks/bench_plan.py``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightlens as wl
from weightlens import linalg
from weightlens.errors import InvalidParameterError, PlanRefusedError
from weightlens.merge.registry import get_method, list_methods, register_merge
from weightlens.planning import RECORDED, calibrate

RATES = RECORDED["H100"]  # fixed rates: no calibration in the tests (its own test below)
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}


@pytest.fixture(scope="module")
def digits():
    return wl.zoo.load("digits-tasks", size="ci").task_vectors()


def _files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(40, 8, generator=g).to(torch.bfloat16), "w": torch.randn(12, 8, generator=g),
            "b": torch.randn(12, generator=g).to(torch.float16), "step": torch.tensor([3])}
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for t in ("a", "b"):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
              for k, v in base.items()}
        paths[t] = tmp_path / f"{t}.safetensors"
        save_file(ft, str(paths[t]))
    return paths


def _header(path):
    """``{key: (shape, bytes)}`` read by the safetensors library itself."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = tuple(sl.get_shape())
            n = 1
            for d in shape:
                n *= d
            out[k] = (shape, n * _ITEMSIZE[sl.get_dtype()])
    return out


def test_keys_shapes_and_bytes_are_the_headers(tmp_path):
    paths = _files(tmp_path)
    tv = wl.TaskVectors(paths["base"], {"a": paths["a"], "b": paths["b"]})
    p = wl.plan(tv, "tsv", device="cpu", rates=RATES)
    heads = {name: _header(path) for name, path in paths.items()}
    float_keys = [k for k in heads["base"] if k != "step"]
    assert sorted(p.keys["key"]) == sorted(float_keys)
    for row in p.keys.itertuples():
        assert row.shape == heads["base"][row.key][0]
        assert row.bytes == sum(h[row.key][1] for h in heads.values())  # the base's and every task's
    dtypes = dict(zip(p.keys["key"], p.keys["dtype"]))
    assert dtypes == {"emb": "bfloat16", "w": "float32", "b": "float16"}


def _counting(monkeypatch):
    """Count every SVD and polar factor weightlens.linalg computes, by (op, m, n)."""
    seen: Counter = Counter()
    svd, polar, topk = linalg.svd, linalg.polar, linalg.topk_svd

    def counted_svd(a, **kw):
        seen["svd", *a.shape[-2:]] += 1
        return svd(a, **kw)

    def counted_topk(a, k, **kw):
        seen["topk_svd", *a.shape[-2:]] += 1
        return topk(a, k, **kw)

    def counted_polar(a, **kw):
        seen["polar", *a.shape[-2:]] += 1
        return polar(a, **kw)

    monkeypatch.setattr(linalg, "svd", counted_svd)
    monkeypatch.setattr(linalg, "polar", counted_polar)
    monkeypatch.setattr(linalg, "topk_svd", counted_topk)
    return seen


def _planned(p) -> Counter:
    out: Counter = Counter()
    for text in p.keys["decompositions"]:
        for part in filter(None, text.split("; ")):
            count, _, what = part.partition(" x ")
            op, size = what.split(" ")[:2]
            m, n = size.split("x")
            out[op, int(m), int(n)] += int(count)
    return out


@pytest.mark.parametrize("method", ["tsv", "iso_c", "ties"])
def test_decompositions_are_what_the_merge_computes(digits, method, monkeypatch, tmp_path):
    tv = wl.TaskVectors(digits.base, digits.finetuned)  # a fresh cache: every decomposition is computed
    p = wl.plan(tv, method, device="cpu", rates=RATES)
    seen = _counting(monkeypatch)
    wl.export(wl.merge(tv, method=method, device="cpu"), tmp_path / "out", progress=False)
    assert seen == _planned(p)
    if method == "ties":
        assert not seen and p.passes == 5  # two radix passes, the majority sign, the merge, export's scope gap
    else:
        assert seen and p.passes == 1


def test_declared_decompositions():
    assert get_method("tsv").decomposes == ("task_tops", "polar")
    assert get_method("iso_c").decomposes == ("sum",)
    assert get_method("star").decomposes == ("tasks",)
    assert get_method("knots_ties").decomposes == ("concat",)
    assert get_method("ties").decomposes == ()
    assert get_method("ties").reading_passes({"scope": "tensor"}) == 0
    with pytest.raises(TypeError, match="unknown decomposes= entries"):
        register_merge("plan_bad", decomposes=("eigh",))(lambda ctx, key: None)
    assert "plan_bad" not in list_methods()


def test_refuses_what_cannot_fit(digits):
    p = wl.plan(digits, "tsv", device="cpu", rates=RATES, memory_limit="1MiB")
    assert not p.fits
    assert "peak host memory" in p.reason and "exceeds the 1.0 MiB available" in p.reason
    with pytest.raises(PlanRefusedError, match="cannot fit") as err:
        p.check()
    assert isinstance(err.value, MemoryError)
    assert "Refused" in p.summary()
    ok = wl.plan(digits, "tsv", device="cpu", rates=RATES, memory_limit=10**13)
    assert ok.fits and ok.check() is ok and ok.peak_host_bytes > 0
    with pytest.raises(InvalidParameterError, match="'memory_limit' parameter of plan"):
        wl.plan(digits, "tsv", rates=RATES, memory_limit="lots")


def test_summary_and_devices(digits):
    p = wl.plan(digits, "tsv", device="cpu", rates=RATES)
    assert set(p.seconds) == {"cpu", "H100", "H200"}
    assert all(s > 0 for s in p.seconds.values())
    assert p.keys["est_seconds"].sum() <= p.seconds["cpu"]
    text = p.summary()
    assert "tsv merge on cpu" in text and "H100" in text and "recorded estimate" in text
    with pytest.raises(InvalidParameterError, match="Unknown parameter"):
        wl.plan(digits, "tsv", rates=RATES, density=0.3)


def test_calibration_is_measured_once_and_cached(tmp_path):
    path = tmp_path / "cal.json"
    first = calibrate("cpu", path=path, methods=[("task_arithmetic", {"alpha": 0.3})])
    assert first.source.startswith("measured") and first.svd_a > 0 and first.read_bytes_per_s > 0
    assert "task_arithmetic()" in first.per_element_s
    saved = json.loads(path.read_text())
    assert len(saved) == 1 and "cpu|" in next(iter(saved))
    again = calibrate("cpu", path=path, methods=[("task_arithmetic", {"alpha": 0.3})])
    assert again == first  # read back, not measured again


def test_cli_plan(digits, tmp_path):
    """``weightlens plan BASE FT...`` prints the summary and the key table; a planted limit refuses (status 1)."""
    import os

    inputs = [digits.base.source, *(f"{t}={ck.source}" for t, ck in digits.finetuned.items())]
    env = {**os.environ, "WEIGHTLENS_HOME": str(tmp_path / "home")}  # its calibration lands here
    cmd = [sys.executable, "-m", "weightlens.cli", "plan", *inputs, "--method", "iso_c", "--device", "cpu"]
    out = subprocess.run([*cmd, "--keys"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "Plan for a iso_c merge on cpu" in out.stdout and "fc2.weight" in out.stdout
    assert (tmp_path / "home" / "calibration.json").exists()
    out = subprocess.run([*cmd, "--memory-limit", "1MB"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "Refused: A iso_c merge" in out.stdout


def test_short_runs_are_not_planned_and_measure_nothing(digits, tmp_path, monkeypatch):
    """``weightlens merge``'s pre-check: a run short even at optimistic rates returns None and calibrates nothing;
    one that cannot fit is refused before any tensor is read."""
    from weightlens.planning import long_run_plan

    monkeypatch.setenv("WEIGHTLENS_HOME", str(tmp_path / "home"))
    assert long_run_plan(digits, "tsv", device="cpu") is None
    assert not (tmp_path / "home" / "calibration.json").exists()
    huge = wl.TaskVectors({"w": torch.zeros(2, 2)}, {"a": {"w": torch.ones(2, 2)}})
    monkeypatch.setattr("weightlens.planning._core.available_memory", lambda: 0)
    monkeypatch.setattr("weightlens.planning._core._rss", lambda: 1)  # nothing left to allocate
    with pytest.raises(PlanRefusedError, match="exceeds"):
        long_run_plan(huge, "task_arithmetic", device="cpu")


def test_decompositions_in_the_cache_are_not_counted_again(digits, monkeypatch, tmp_path):
    """After a TSV-M merge and export the per-task SVDs are cached (the updates are not: export keeps none):
    a second plan counts only the polar factors, and a second merge computes exactly those."""
    tv = wl.TaskVectors(digits.base, digits.finetuned)
    first = _planned(wl.plan(tv, "tsv", device="cpu", rates=RATES))
    wl.export(wl.merge(tv, method="tsv", device="cpu"), tmp_path / "a", progress=False)  # keeps no update
    again = wl.plan(tv, "tsv", device="cpu", rates=RATES)
    assert {op for op in _planned(again)} == {op for op in first if op[0] == "polar"}
    seen = _counting(monkeypatch)
    wl.export(wl.merge(tv, method="tsv", device="cpu"), tmp_path / "b", progress=False)
    assert seen == _planned(again)


def test_the_svd_model_fit_recovers_planted_rates_and_prices_tall_matrices_apart():
    # seconds = a m n r + c r^3 + b: timings made from planted (a, c, b) give them back (non-negative least
    # squares in relative error); a tall matrix costs less per m n r than a square one of the same work.
    from weightlens.planning._rates import _SVD_SIZES, Rates, _fit_svd

    a, c, b = 2e-10, 1.5e-10, 7e-4
    times = [a * m * n * min(m, n) + c * min(m, n) ** 3 + b for m, n in _SVD_SIZES]
    got = _fit_svd(times)
    assert got == pytest.approx((a, c, b), rel=1e-6)
    rates = Rates("cpu", 1e9, 1e9, 1e10, 1e11, got[0], got[2], svd_c=got[1])
    assert rates.svd_seconds(4096, 512) == pytest.approx(a * 4096 * 512**2 + c * 512**3 + b, rel=1e-6)
    assert rates.svd_seconds(512, 4096) == rates.svd_seconds(4096, 512)
    assert rates.svd_seconds(512, 512, torch.float64) == pytest.approx(2 * (a + c) * 512**3 + b, rel=1e-6)
    # timings that do not grow with size (noise) would price every SVD at a constant: a line through the
    # largest size instead
    (m, n) = _SVD_SIZES[-1]
    assert _fit_svd([1e-3] * len(_SVD_SIZES)) == pytest.approx((1e-3 / (m * n * min(m, n)), 0.0, 0.0))
