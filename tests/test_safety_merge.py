"""Bad input on the merge side gets one clear error; the documented merge-then-export flow holds one key.

Error cases: no fine-tunes, a comparison against a merge of other shapes or with a missing key, and
merge parameters whose magnitude gives Inf or NaN weights (checked before any tensor is read).
Memory: ``wl.merge`` computes nothing, indexing keeps what it computed, ``wl.export`` keeps nothing
(at most one merged tensor alive, no update left in the cache), and the default cache size follows
the available memory (fake ``/proc/meminfo`` and cgroup files).
"""

from __future__ import annotations

import gc
import hashlib
import math
import weakref
from pathlib import Path

import pytest
import torch

import weightlens as wl
from weightlens.io import Checkpoint, TensorInfo
from weightlens.linalg import DecompositionCache
from weightlens.linalg.cache import default_cache_bytes
from weightlens.linalg.devices import available_memory
from weightlens.merge import compare, engine, merge
from weightlens.merge.sweep import alpha_grid

from _safety import assert_unchanged, snapshot
from test_merge_methods import make_models

MiB, GiB = 2**20, 2**30


def counting(sd: dict[str, torch.Tensor], reads: list[str], name: str) -> Checkpoint:
    """A checkpoint of ``sd`` that records every tensor read in ``reads``."""
    infos = {k: TensorInfo(tuple(v.shape), v.dtype, None) for k, v in sd.items()}

    def read(key: str) -> torch.Tensor:
        reads.append(key)
        return sd[key].clone()

    return Checkpoint(infos, read, name=name, source=f"<{name}>")


@pytest.fixture
def models():
    return make_models(seed=3)


@pytest.fixture
def tv(models):
    return wl.TaskVectors(*models)


# ------------------------------------------------------------------------------ no fine-tunes
@pytest.mark.parametrize("empty", [{}, [], (), None], ids=["dict", "list", "tuple", "None"])
def test_task_vectors_without_fine_tunes_say_how_to_pass_them(models, empty):
    with pytest.raises(wl.InvalidParameterError) as err:
        wl.TaskVectors(models[0], empty)
    msg = str(err.value)
    assert "\n" not in msg and "at least one fine-tuned checkpoint" in msg
    assert "TaskVectors(base, ['ft/a', 'ft/b'])" in msg and "TaskVectors(base, {'a': 'ft/a'})" in msg


# ------------------------------------------------------------------------------ compare
def test_compare_with_a_merge_of_other_shapes_names_the_key_and_both_shapes(models, tv):
    base, fts = models
    grow = lambda sd: {k: torch.zeros(7, 8) if k == "enc.weight" else v for k, v in sd.items()}  # noqa: E731
    other = merge(wl.TaskVectors(grow(base), {n: grow(ft) for n, ft in fts.items()}), method="task_arithmetic")
    with pytest.raises(wl.ShapeMismatchError) as err:
        compare(tv, other)
    msg = str(err.value)
    assert "'enc.weight'" in msg and "(7, 8)" in msg and "(12, 8)" in msg and "wl.merge(tv" in msg
    assert len(tv.cache) == 0  # checked before any key was compared


def test_compare_with_plain_weights_of_another_shape_or_without_a_key(tv):
    weights = dict(merge(tv, method="task_arithmetic"))
    entries = len(tv.cache)
    with pytest.raises(wl.ShapeMismatchError, match=r"'dec.weight' has shape \(10, 6\) .* but \(6, 10\)"):
        compare(tv, {**weights, "dec.weight": torch.zeros(10, 6)})
    del weights["enc.bias"]
    with pytest.raises(wl.KeyMismatchError, match=r"key 'enc.bias' of the task vectors .* is missing"):
        compare(tv, weights)
    assert len(tv.cache) == entries  # checked before any key was compared


def test_compare_with_a_merge_that_left_a_key_out_names_it(models, tv):
    partial = merge(wl.TaskVectors(*models, exclude="dec.*"), method="task_arithmetic")
    with pytest.raises(wl.KeyMismatchError, match=r"key 'dec.weight' .* received no update in the merge"):
        compare(tv, partial)


# ------------------------------------------------------------------------------ parameter magnitude
@pytest.mark.parametrize("method, param, value", [
    ("task_arithmetic", "alpha", 1e300),
    ("tsv", "alpha", -1e300),
    ("ties", "alpha", 2e6),
    ("iso_c", "alpha", 1e-300),
    ("dare", "density", 1e-300),  # DARE rescales by 1/density: 0/0 in float32
    ("ties", "density", 1e-7),
])
def test_parameters_whose_magnitude_overflows_are_refused_before_any_read(models, method, param, value):
    reads: list[str] = []
    base, fts = models
    tv = wl.TaskVectors(counting(base, reads, "base"), {n: counting(ft, reads, n) for n, ft in fts.items()})
    with pytest.raises(wl.InvalidParameterError) as err:
        merge(tv, method=method, **{param: value})
    msg = str(err.value)
    assert f"The {param!r} parameter of {method} is {value!r}" in msg
    assert "[1e-06, 1e+06]" in msg and "\n" not in msg
    assert reads == [] and len(tv.cache) == 0


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_parameters_are_refused(tv, value):
    with pytest.raises(wl.InvalidParameterError, match=r"'alpha' parameter of tsv must be a real number\. Got"):
        merge(tv, method="tsv", alpha=value)
    with pytest.raises(wl.InvalidParameterError, match=r"'eta' parameter of star must be in \(0, 100\]"):
        merge(tv, method="star", eta=value)


def test_huge_integer_parameters_give_the_same_error_class(tv):
    merge(tv, method="dare", seed=10**400)  # any int seeds the hash: accepted, no OverflowError
    with pytest.raises(wl.InvalidParameterError, match="'seed' parameter of dare must be an int"):
        merge(tv, method="dare", seed=1e300)


def test_every_documented_value_is_accepted(tv):
    for method in ("task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "star"):
        for alpha in alpha_grid(method, len(tv)):
            merge(tv, method=method, alpha=alpha)
    for alpha in (0, 0.0, -1.0, 3.0, 1e-6, -1e6, 1e6):
        merge(tv, method="task_arithmetic", alpha=alpha)
    merge(tv, method="dare", density=1e-6)


# ------------------------------------------------------------------------------ memory of merge + export
def test_merge_computes_nothing_and_indexing_keeps_what_it_computed(tv):
    merged = merge(tv, method="tsv", alpha=0.7)
    assert not merged._weights and not any(k[:2] == ("merge", "update") for k in tv.cache._entries)
    first = merged["enc.weight"]
    assert merged["enc.weight"] is first and list(merged._weights) == ["enc.weight"]
    assert not merged.lazy and "1 of 7 held" in repr(merged)
    assert merged.peek("enc.weight") is first  # a kept key is not recomputed
    peeked = merged.peek("dec.weight")
    assert "dec.weight" not in merged._weights and torch.equal(peeked, merged["dec.weight"])


def test_export_of_the_default_merge_holds_one_merged_key_at_a_time(tv, tmp_path, monkeypatch):
    alive: list[weakref.ref] = []
    most = []
    full = engine._full

    def tracked(*args):
        gc.collect()
        most.append(sum(r() is not None for r in alive))  # merged tensors alive when the next is made
        out = full(*args)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(engine, "_full", tracked)
    merged = merge(tv, method="ties", alpha=1.0)
    wl.export(merged, tmp_path / "out", progress=False, recipe=False)
    assert len(most) == len(tv.keys) and max(most) == 0
    assert not merged._weights and not merged.lazy  # nothing kept, still keeps what is indexed
    assert not any(k[:2] == ("merge", "update") for k in tv.cache._entries)  # no update left behind
    misses = tv.cache.misses
    assert merged.notes.empty and tv.cache.misses == misses  # notes recorded during the export


def test_export_uses_the_keys_indexing_kept(tv, tmp_path):
    merged = merge(tv, method="task_arithmetic")
    kept = merged["enc.weight"]
    kept.add_(1.0)  # the user's edit of a kept key is what gets written
    out = wl.export(merged, tmp_path / "out", progress=False, recipe=False)
    assert torch.equal(wl.load(out)["enc.weight"], kept) and list(merged._weights) == ["enc.weight"]


@pytest.mark.parametrize("method", ["ties", "iso_cts"])
def test_the_default_flow_writes_the_same_bytes_as_a_materialised_and_a_lazy_merge(models, tmp_path, method):
    def weights_sha(how: str) -> str:
        merged = merge(wl.TaskVectors(*models), method=method, lazy=how == "lazy")
        if how == "materialised":
            merged.materialize()
        out = wl.export(merged, tmp_path / how, progress=False, recipe=False)
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    assert weights_sha("default") == weights_sha("materialised") == weights_sha("lazy")


def test_a_refused_merge_writes_nothing(tv, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(wl.InvalidParameterError):
        wl.export(merge(tv, method="task_arithmetic", alpha=1e300), tmp_path / "out", progress=False)
    assert_unchanged(before, tmp_path)


# ------------------------------------------------------------------------------ default cache size
def test_default_cache_size_is_an_eighth_of_available_memory_clamped():
    assert default_cache_bytes(8 * GiB) == 1 * GiB
    assert default_cache_bytes(1 * GiB) == 256 * MiB  # floor
    assert default_cache_bytes(0) == 256 * MiB
    assert default_cache_bytes(64 * GiB) == 2 * GiB  # ceiling
    assert default_cache_bytes(None) == 2 * GiB  # unknown: the ceiling (the former fixed default)
    assert 256 * MiB <= DecompositionCache().max_bytes <= 2 * GiB
    assert DecompositionCache(max_bytes=123).max_bytes == 123


def _files(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = _files(tmp_path, {"meminfo": "MemTotal: 16000000 kB\nMemAvailable:    8000000 kB\n"}) / "meminfo"
    none = tmp_path / "no-cgroup"
    assert available_memory(str(none), str(meminfo)) == 8_000_000 * 1024
    v2 = _files(tmp_path / "v2", {"memory.max": str(4 * GiB), "memory.current": str(3 * GiB),
                                  "memory.stat": f"anon 1\ninactive_file {GiB}\n"})
    assert available_memory(str(v2), str(meminfo)) == 2 * GiB  # limit - usage + reclaimable cache
    unlimited = _files(tmp_path / "max", {"memory.max": "max", "memory.current": str(GiB)})
    assert available_memory(str(unlimited), str(meminfo)) == 8_000_000 * 1024
    v1 = _files(tmp_path / "v1", {"memory/memory.limit_in_bytes": str(GiB),
                                  "memory/memory.usage_in_bytes": str(GiB // 2),
                                  "memory/memory.stat": "total_inactive_file 0\n"})
    assert available_memory(str(v1), str(meminfo)) == GiB // 2
    v1_unlimited = _files(tmp_path / "v1u", {"memory/memory.limit_in_bytes": str(2**63 - 4096),
                                             "memory/memory.usage_in_bytes": "5"})
    assert available_memory(str(v1_unlimited), str(meminfo)) == 8_000_000 * 1024
    full = _files(tmp_path / "full", {"memory.max": str(GiB), "memory.current": str(2 * GiB)})
    assert available_memory(str(full), str(meminfo)) == 0
