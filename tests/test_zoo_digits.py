"""The digits zoos: real MLPs trained here on sklearn's digits, checked against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from weightlens import zoo
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.zoo import _digits_data, _digits_train, digits

BODY_KEYS = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Both digits zoos at CI size, built once into a private root."""
    path = tmp_path_factory.mktemp("zoo")
    zoo.build(size="ci", names=["digits-pairs", "digits-tasks"], root=path, progress=False)
    return path


@pytest.fixture(scope="module")
def tasks(root):
    return zoo.load("digits-tasks", size="ci", root=root)


def _pairs(root, width):
    return zoo.load("digits-pairs", size="ci", root=root, width=width)


def _ref_metrics(sd, x, y, layers):
    """Float64 forward of a ReLU MLP (ReLU after every layer but the last) and its metrics."""
    h = torch.as_tensor(x, dtype=torch.float64)
    for i, name in enumerate(layers):
        h = h @ sd[f"{name}.weight"].double().T + sd[f"{name}.bias"].double()
        h = torch.relu(h) if i < len(layers) - 1 else h
    y = torch.as_tensor(y)
    loss = (torch.logsumexp(h, 1) - h.gather(1, y[:, None])[:, 0]).mean()
    return float((h.argmax(1) == y).double().mean()), float(loss)


def _assert_matches(got, ref, n):
    assert got["accuracy"] == pytest.approx(ref[0], abs=1.01 / n)  # at most one float32 argmax flip
    assert got["loss"] == pytest.approx(ref[1], rel=1e-4)


# ------------------------------------------------------------------------------------ pairs


@pytest.mark.slow
@pytest.mark.parametrize("width", [128, 512])
def test_independent_pairs_are_accurate_on_the_test_split(root, width):
    z = _pairs(root, width)
    for model in ("a", "b"):
        assert z.manifest["pairs"][str(width)][model]["test"]["accuracy"] >= 0.95
    # Independent reference: sklearn split, numpy standardization, float64 forward of the file.
    x, y = load_digits(return_X_y=True)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    mean, std = x[tr].mean(0), x[tr].std(0)
    std[std == 0] = 1
    ref = _ref_metrics(load_file(z.a), (x[te] - mean) / std, y[te], ["fc1", "fc2", "fc3"])
    assert ref[0] >= 0.95
    _assert_matches(z.evaluate(load_file(z.a), "test"), ref, len(te))


@pytest.mark.slow
def test_pair_models_differ_and_evaluate_reproduces_the_manifest(root):
    z = _pairs(root, 128)
    a, b = load_file(z.a), load_file(z.b)
    assert set(a) == set(b) == set(z.make_module().state_dict()) == {
        f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")
    }
    assert a["fc2.weight"].shape == (128, 128) and a["fc3.weight"].shape == (10, 128)
    assert all(not torch.equal(a[k], b[k]) for k in a)
    for split in ("train", "test"):
        assert z.evaluate(a, split) == pytest.approx(z.manifest["pairs"]["128"]["a"][split], rel=1e-6)
    xtr, ytr = z.data("train")
    xte, yte = z.data("test")
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert len(ytr) + len(yte) == 1797 and len(yte) == 450
    torch.testing.assert_close(xtr.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    all_counts = np.bincount(np.concatenate([ytr.numpy(), yte.numpy()]))
    assert np.abs(np.bincount(yte.numpy()) - all_counts / 4).max() <= 1  # stratified


@pytest.mark.slow
@pytest.mark.parametrize("width", [16, 128])
def test_naive_midpoint_sits_on_a_loss_barrier(root, width):
    z = _pairs(root, width)
    a, b = load_file(z.a), load_file(z.b)
    mid = z.evaluate({k: (a[k] + b[k]) / 2 for k in a}, "test")
    assert mid == pytest.approx(z.manifest["pairs"][str(width)]["midpoint"]["test"], rel=1e-6)
    ends = [z.manifest["pairs"][str(width)][m]["test"] for m in ("a", "b")]
    assert mid["accuracy"] < min(e["accuracy"] for e in ends) - 0.05
    assert mid["loss"] > max(e["loss"] for e in ends) + 0.2


def test_pair_errors_name_the_options(root):
    with pytest.raises(InvalidParameterError, match=r"'width'.*\(16, 128, 512\).*64"):
        _pairs(root, 64)
    z = _pairs(root, 16)
    a = load_file(z.a)
    with pytest.raises(InvalidParameterError, match="'split'"):
        z.evaluate(a, "val")
    with pytest.raises(KeyMismatchError, match="fc3.bias"):
        z.evaluate({k: v for k, v in a.items() if k != "fc3.bias"}, "test")
    with pytest.raises(ShapeMismatchError, match="fc1.weight"):
        _pairs(root, 128).evaluate(a, "test")


# ------------------------------------------------------------------------------------ tasks


def test_task_transforms_match_their_definitions():
    img = np.arange(64, dtype=np.float64).reshape(1, 8, 8)
    flat = img.reshape(1, 64)
    out = {t: _digits_data.transform(flat, t).reshape(8, 8) for t in digits.TASKS}
    i, j = np.indices((8, 8))
    np.testing.assert_array_equal(out["rot90"], img[0][j, 7 - i])  # counter-clockwise
    np.testing.assert_array_equal(out["hflip"], img[0][i, 7 - j])
    np.testing.assert_array_equal(out["invert"], 16 - img[0])
    perm = digits.block_permutation()
    assert sorted(perm) == list(range(16)) and (perm != np.arange(16)).any()
    src = perm[(i // 2) * 4 + j // 2]  # output block (i//2, j//2) comes from input block src
    expected = img[0][2 * (src // 4) + i % 2, 2 * (src % 4) + j % 2]
    np.testing.assert_array_equal(out["blockperm"], expected)


@pytest.mark.slow
def test_finetunes_beat_the_base_model(tasks):
    m = tasks.manifest
    assert tasks.tasks == ["rot90", "hflip", "invert", "blockperm"]
    for split in ("val", "test"):
        assert m["mean"]["finetuned"][split]["accuracy"] > m["mean"]["base"][split]["accuracy"] + 0.01
    base = load_file(tasks.base)
    for task in tasks.tasks:
        ft = tasks.evaluate(load_file(tasks.finetuned[task]), task, "val")
        b = tasks.evaluate(base, task, "val")
        assert ft["accuracy"] > b["accuracy"] and ft["loss"] < b["loss"]
        assert b == pytest.approx(m["per_task"][task]["base"]["val"], rel=1e-6)


@pytest.mark.slow
def test_task_evaluate_matches_manifest_and_a_float64_reference(tasks):
    heads = load_file(tasks.folder / "heads.safetensors")
    split = load_file(tasks.folder / "split.safetensors")
    x, y = load_digits(return_X_y=True)
    m, sd_ = x[split["train"].numpy()].mean(), x[split["train"].numpy()].std()  # one scalar scaling
    assert set(load_file(tasks.base)) == BODY_KEYS
    for task in tasks.tasks:
        body = load_file(tasks.finetuned[task])
        assert set(body) == BODY_KEYS
        got = tasks.evaluate(body, task, "test")
        assert got == pytest.approx(tasks.manifest["per_task"][task]["finetuned"]["test"], rel=1e-6)
        sd = {**body, "head.weight": heads[f"{task}.weight"], "head.bias": heads[f"{task}.bias"]}
        xt = (_digits_data.transform(x[split["test"].numpy()], task) - m) / sd_
        ref = _ref_metrics(sd, xt, y[split["test"].numpy()], ["fc1", "fc2", "head"])
        _assert_matches(got, ref, len(xt))
    idx = [set(split[s].tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, idx)) == 1797 and not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])


@pytest.mark.slow
def test_task_arithmetic_record_shows_interference(tasks):
    ta = tasks.manifest["task_arithmetic"]
    base = load_file(tasks.base)
    fts = {t: load_file(tasks.finetuned[t]) for t in tasks.tasks}
    merged = {k: base[k] + sum(ft[k] - base[k] for ft in fts.values()) for k in base}  # alpha 1
    got = tasks.evaluate(merged, "invert", "test")
    assert got == pytest.approx(ta["1.0"]["per_task"]["invert"]["test"], rel=1e-5)
    base_acc = tasks.manifest["mean"]["base"]["test"]["accuracy"]
    assert ta["0.25"]["mean"]["test"]["accuracy"] > base_acc  # a small step along the sum helps ...
    assert ta["1.0"]["mean"]["test"]["accuracy"] < base_acc  # ... the full sum interferes


@pytest.mark.slow
def test_the_planted_conflict_hurts_rot90_through_fc2_alone(root, tasks):
    # A fifth fine-tune trained (not edited) to oppose rot90 in fc2: its update lies in fc2 only, a merge of
    # all five loses rot90, and restoring fc2 to rot90's own update gives it back; other blocks do not.
    planted = zoo.load("digits-tasks", size="ci", root=root, planted=True)
    assert planted.tasks == [*tasks.tasks, "rot90_swap"] and "rot90_swap" not in tasks.tasks
    base, fts = load_file(tasks.base), {t: load_file(planted.finetuned[t]) for t in planted.tasks}
    swap = fts["rot90_swap"]
    assert torch.equal(swap["fc1.weight"], base["fc1.weight"]) and torch.equal(swap["fc1.bias"], base["fc1.bias"])
    assert not torch.equal(swap["fc2.weight"], base["fc2.weight"])
    assert planted.evaluate(swap, "rot90_swap", "test")["accuracy"] > 0.8  # it learned its swapped labels

    def merge(tasks_, alpha=0.5, restore=None):
        out = {k: base[k] + alpha * sum(fts[t][k] - base[k] for t in tasks_) for k in base}
        for k in base:
            if restore and k.startswith(restore):
                out[k] = fts["rot90"][k]
        return out

    four, five = list(tasks.tasks), planted.tasks
    acc = {name: planted.evaluate(sd, "rot90", "test")["accuracy"] for name, sd in {
        "without": merge(four), "with": merge(five), "fc2": merge(five, restore="fc2."),
        "fc1": merge(five, restore="fc1.")}.items()}
    assert acc["with"] < acc["without"] - 0.2, acc  # the conflict costs rot90 a lot
    assert acc["fc2"] >= acc["without"], acc  # restoring the planted block recovers all of it
    assert acc["fc1"] < acc["without"] - 0.2, acc  # the other block does not
    record = planted.manifest["planted"]["metrics"]
    assert record["merged_with"]["rot90"]["accuracy"] == pytest.approx(acc["with"], abs=1e-9)
    assert record["merged_with_block_restored"]["rot90"]["accuracy"] == pytest.approx(acc["fc2"], abs=1e-9)


def test_task_errors_name_the_options(tasks):
    base = load_file(tasks.base)
    with pytest.raises(InvalidParameterError, match="'task'.*rot90"):
        tasks.evaluate(base, "rot45", "test")
    with pytest.raises(InvalidParameterError, match="'split'"):
        tasks.evaluate(base, "rot90", "dev")
    with pytest.raises(KeyMismatchError, match="unexpected"):
        tasks.evaluate({**base, "fc3.weight": torch.zeros(1)}, "rot90", "test")


# ------------------------------------------------------------------------------------ builds


@pytest.mark.slow
def test_rebuilding_gives_bitwise_identical_files_and_leaves_the_rng_alone(root, tmp_path):
    rng = torch.get_rng_state()
    again = zoo.build(size="ci", names=["digits-tasks"], root=tmp_path, progress=False)["digits-tasks"]
    assert torch.equal(rng, torch.get_rng_state())
    first = root / "ci" / "digits-tasks"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"base.safetensors", "heads.safetensors", "split.safetensors", "manifest.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_existing_zoo_is_skipped_unless_forced(root, tmp_path, monkeypatch):
    calls = []

    def fake(folder, *, size, progress):
        calls.append(folder)
        (folder / "marker").write_text(str(len(calls)))
        return {"calls": len(calls)}

    monkeypatch.setattr(digits, "build_tasks", fake)
    zoo.build(size="ci", names=["digits-tasks"], root=root, progress=False)  # the real one exists
    assert calls == []
    zoo.build(size="ci", names=["digits-tasks"], root=tmp_path, progress=False)
    zoo.build(size="ci", names=["digits-tasks"], root=tmp_path, progress=False)
    assert len(calls) == 1
    folders = zoo.build(size="ci", names=["digits-tasks"], root=tmp_path, force=True, progress=False)
    assert len(calls) == 2 and (folders["digits-tasks"] / "marker").read_text() == "2"


@pytest.mark.slow
def test_interrupted_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(_digits_train, "fit_head", boom)  # after pretraining wrote base.safetensors
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo.build(size="ci", names=["digits-tasks"], root=tmp_path, progress=False)
    assert list((tmp_path / "ci").iterdir()) == []
