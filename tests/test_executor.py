"""``executor="ray"`` on merge, export and analyze: a real local Ray cluster (``ray.init(num_cpus=2)``),
results bitwise the serial path's (issue 18, item 3).

The tests marked ``ray`` share one cluster per module (its start is most of their time). Without Ray
they skip with the reason; in CI (``CI=true``, where ``./dev.sh test`` installs the ``ray`` extra) a
missing Ray fails them instead. The rest run everywhere: executor names, the error without Ray, and
the pickling that lets a task re-open its inputs from their files.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import weightlens as wl
from weightlens import linalg
from weightlens._executor import map_keys
from weightlens.analysis import analyze
from weightlens.errors import CheckpointError, InvalidParameterError, NonFiniteError
from weightlens.io import export
from weightlens.merge import RunRecipeOptions, merge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray
    except ImportError:
        reason = "ray is not installed (pip install 'weightlens[ray]'; ./dev.sh test installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the Ray executor tests must run in CI: {reason}")
        pytest.skip(reason)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a new one, always
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this file
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_tsv(digits_zoo):
    """The serial TSV-M merge of the digits task zoo, every key computed, and its task vectors."""
    tv = _tv(digits_zoo)
    return tv, merge(tv, method="tsv").materialize()


HANG_S = 150  # a guard, not a timing: a task Ray cannot schedule would otherwise hang CI


@pytest.fixture(autouse=True)
def _no_hang(request):
    if request.node.get_closest_marker("ray") is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise TimeoutError(f"{request.node.name} ran past {HANG_S} s: a Ray task never finished")

    before = signal.signal(signal.SIGALRM, stop)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _tv(zoo):
    """Fresh task vectors (an empty cache) over the zoo's files."""
    return zoo.task_vectors()


def _same_cache(a: linalg.DecompositionCache, b: linalg.DecompositionCache) -> None:
    left, right = dict(a.items()), dict(b.items())
    assert left.keys() == right.keys()
    for key, value in left.items():
        flat_a, flat_b = _tensors(value), _tensors(right[key])
        assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), key


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [t for v in getattr(value, "__dict__", {}).values() for t in _tensors(v)]


# ------------------------------------------------------------------------------- on a real cluster
@pytest.mark.ray
def test_ray_workers_import_this_weightlens(ray_cluster):
    """The cluster runs the code under test, not another installed copy."""
    found = dict(map_keys(_module_file, ["k"], executor="ray"))
    assert found == {"k": wl.__file__}


def _module_file(shared, key):
    import weightlens

    return weightlens.__file__


@pytest.mark.ray
@pytest.mark.parametrize("method", ["tsv", "ties"])  # spectral (per-task SVDs) and magnitude (global TIES)
def test_ray_merge_is_bitwise_the_serial_merge_and_fills_the_same_cache(ray_cluster, digits_zoo, serial_tsv, method):
    serial_tv, ray_tv = (serial_tsv[0] if method == "tsv" else _tv(digits_zoo)), _tv(digits_zoo)
    serial = serial_tsv[1] if method == "tsv" else merge(serial_tv, method=method).materialize()
    remote = merge(ray_tv, method=method, executor="ray").materialize()
    assert list(serial) == list(remote)
    for key in serial:
        assert torch.equal(serial[key], remote[key]), key
    pd.testing.assert_frame_equal(serial.notes, remote.notes)
    _same_cache(serial_tv.cache, ray_tv.cache)


@pytest.mark.ray
def test_ray_export_writes_the_serial_shards_byte_for_byte(ray_cluster, digits_zoo, serial_tsv, tmp_path):
    serial = export(serial_tsv[1], tmp_path / "serial", shard_size="200KB", progress=False)
    remote = export(merge(_tv(digits_zoo), method="tsv", executor="ray"), tmp_path / "ray", shard_size="200KB",
                    progress=False)  # the merge's executor: computed by Ray tasks while the shards are written
    _same_shards(serial, remote)


def _same_shards(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in [*shards, *(["model.safetensors.index.json"] if len(shards) > 1 else [])]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.ray
def test_ray_from_the_command_line_writes_the_local_shards(ray_cluster, digits_zoo, tmp_path):
    from weightlens.cli import main

    flags = ["merge", "--base", str(digits_zoo.base), "--method", "ties", "--device", "cpu", "-q"]
    flags += [arg for task, path in digits_zoo.finetuned.items() for arg in ("--ft", f"{task}={path}")]
    assert main([*flags, "--shard-size", "200KB", "--out", str(tmp_path / "local")]) == 0
    assert main([*flags, "--shard-size", "200KB", "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert len(list((tmp_path / "ray").glob("*.safetensors"))) > 1
    _same_shards(tmp_path / "local", tmp_path / "ray")


@pytest.mark.ray
def test_ray_analyze_tables_equal_the_serial_tables(ray_cluster, digits_zoo):
    serial_tv, ray_tv = _tv(digits_zoo), _tv(digits_zoo)
    serial = analyze(serial_tv, progress=False)
    remote = analyze(ray_tv, progress=False, executor="ray")
    for table in ("spectra", "alignment", "pairs", "interference", "signs", "singular_values", "cosines"):
        pd.testing.assert_frame_equal(getattr(serial, table), getattr(remote, table), check_exact=True)
    _same_cache(serial_tv.cache, ray_tv.cache)


@pytest.mark.ray
def test_ray_tasks_raise_the_serial_error_and_take_in_memory_task_vectors(ray_cluster, tmp_path):
    base = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    good = {"w": torch.eye(3), "b": torch.ones(3)}
    tv = wl.TaskVectors(base, {"a": good, "b": {"w": -torch.eye(3), "b": torch.ones(3)}})
    serial = export(merge(tv, method="ties"), tmp_path / "serial", progress=False, recipe=False)
    remote = export(merge(tv, method="ties"), tmp_path / "ray", progress=False, recipe=False, executor="ray")
    _same_shards(serial, remote)
    bad = wl.TaskVectors(base, {"a": good, "b": {"w": torch.full((3, 3), float("nan")), "b": torch.ones(3)}})
    with pytest.raises(NonFiniteError, match="'w'"):
        merge(bad, method="task_arithmetic", executor="ray").materialize()


# ------------------------------------------------------------------------------- everywhere
def test_an_unknown_executor_is_refused_with_the_valid_names(digits_zoo, tmp_path):
    tv = _tv(digits_zoo)
    message = "The 'executor' parameter of merge must be one of ['local', 'ray']. Got 'dask' instead."
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(").replace("[", r"\[")):
        merge(tv, method="tsv", executor="dask")
    with pytest.raises(InvalidParameterError, match="'executor' parameter of analyze"):
        analyze(tv, executor="dask")
    with pytest.raises(InvalidParameterError, match="'executor' parameter of export"):
        export(merge(tv, method="tsv"), tmp_path / "x", executor="dask")
    with pytest.raises(InvalidParameterError, match="holds finished tensors"):
        export({"w": torch.ones(2)}, tmp_path / "y", executor="ray")
    with pytest.raises(InvalidParameterError, match="adapter runs in this process"):
        export(merge(tv, method="tsv"), tmp_path / "z", as_adapter=True, executor="ray")
    with pytest.raises(InvalidParameterError, match="'executor' parameter of run_recipe"):
        RunRecipeOptions(executor="dask")


def test_without_ray_the_error_names_the_extra(monkeypatch, digits_zoo):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'weightlens\[ray\]'"):
        merge(_tv(digits_zoo), method="tsv", executor="ray").materialize()


def test_a_checkpoint_from_a_file_pickles_as_its_path_and_reopens(digits_zoo, tmp_path):
    tv = _tv(digits_zoo)
    tv.deltas(tv.keys[0])
    tv.cache.get_or_compute(("x",), lambda: torch.ones(1000))
    blob = pickle.dumps(tv)
    assert len(blob) < 20_000  # paths and headers: no tensor, no cache entry
    back = pickle.loads(blob)
    assert len(back.cache) == 0 and back.cache.max_bytes == tv.cache.max_bytes
    assert all(torch.equal(back.deltas(k), tv.deltas(k)) for k in tv.keys)
    path = tmp_path / "w.safetensors"
    wl.io.export({"w": torch.ones(2, 2)}, tmp_path / "m", progress=False, recipe=False)
    path.write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    ckpt = wl.load(path)
    blob = pickle.dumps(ckpt)
    wl.io.export({"w": torch.ones(3, 2)}, tmp_path / "n", progress=False, recipe=False)
    path.write_bytes((tmp_path / "n" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="changed since it was opened"):
        pickle.loads(blob)
