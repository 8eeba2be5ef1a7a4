"""Pre-merge checks of ``wl.diagnose`` fire on planted cases built from the digits zoo's real weights.

* a fine-tune of another base: the base with its hidden units permuted (another training run of the same
  architecture is one), plus a real task's update: ``foreign_base`` fires for it alone;
* a task scaled 10x: ``dominant_task`` fires for it, ``foreign_base`` does not (a scaled update still
  points nowhere near ``-base``);
* a rank-2 truncation of a real update (LoRA-like): ``low_rank`` fires for it alone;
* the zoo as it is: nothing fires (the checks' thresholds leave real fine-tunes alone).

The planted task vectors leave out ``fc2.weight`` (``exclude``): its 512 x 512 decompositions are the slow
part on a shared CPU, and ``fc1.weight`` (512 x 64) and both biases carry every planted case.
"""

from __future__ import annotations

import pytest
import torch

import weightlens as wl
from weightlens.diagnosis import diagnose


@pytest.fixture(scope="module")
def parts(digits_zoo):
    tv = digits_zoo.task_vectors(["rot90", "hflip", "invert"])
    base = {k: tv.base_tensor(k) for k in tv.keys}
    deltas = {t: {k: tv.delta(t, k) for k in tv.keys} for t in tv.names}
    return base, deltas


def _fired(d, check: str) -> list[str]:
    rows = d.checks[(d.checks["check"] == check) & d.checks["fired"]]
    return sorted(rows["task"])


def _finetunes(base, deltas, **planted):
    out = {t: {k: base[k] + d[k] for k in base} for t, d in deltas.items()}
    out.update(planted)
    return out


def _tv(base, finetuned) -> wl.TaskVectors:
    return wl.TaskVectors(base, finetuned, exclude="fc2.weight")


def _permuted(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same network with both hidden layers' units permuted: a different point, the same function."""
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randperm(base["fc1.weight"].shape[0], generator=g), torch.randperm(
        base["fc2.weight"].shape[0], generator=g)
    return {"fc1.weight": base["fc1.weight"][p1], "fc1.bias": base["fc1.bias"][p1],
            "fc2.weight": base["fc2.weight"][p2][:, p1], "fc2.bias": base["fc2.bias"][p2]}


def test_the_zoo_as_it_is_fires_nothing(parts):
    base, deltas = parts
    d = diagnose(_tv(base, _finetunes(base, deltas)), None, progress=False)
    assert not d.checks["fired"].any(), d.checks


def test_a_finetune_of_another_base_is_flagged(parts):
    base, deltas = parts
    other = _permuted(base)
    foreign = {k: other[k] + deltas["invert"][k] for k in base}
    d = diagnose(_tv(base, _finetunes(base, deltas, invert=foreign)), None, progress=False)
    assert _fired(d, "foreign_base") == ["invert"]
    row = d.checks[(d.checks["check"] == "foreign_base") & (d.checks["task"] == "invert")].iloc[0]
    assert row["value"] > 1.0 and "fine-tune of another base model" in row["message"]
    assert "foreign_base" in d.tasks.set_index("task").loc["invert", "checks"]
    assert "Check foreign_base: 'invert' is" in d.summary()


def test_a_task_scaled_ten_times_dominates_and_is_not_called_foreign(parts):
    base, deltas = parts
    scaled = {k: base[k] + 10 * deltas["hflip"][k] for k in base}
    tv = _tv(base, _finetunes(base, deltas, hflip=scaled))
    d = diagnose(tv, None, progress=False)
    assert _fired(d, "dominant_task") == ["hflip"] and _fired(d, "foreign_base") == []
    row = d.checks[(d.checks["check"] == "dominant_task") & (d.checks["task"] == "hflip")].iloc[0]
    norms = {t: sum(float(tv.delta(t, k).double().square().sum()) for k in tv.keys) ** 0.5 for t in tv.names}
    others = sorted(v for t, v in norms.items() if t != "hflip")
    assert row["value"] == pytest.approx(norms["hflip"] / ((others[0] + others[1]) / 2), rel=1e-6)
    merged = diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.3), progress=False)
    assert merged.checks[["check", "task", "fired"]].equals(d.checks[["check", "task", "fired"]])


def test_a_rank_two_update_is_flagged_lora_like(parts):
    base, deltas = parts
    low = {}
    for k, delta in deltas["rot90"].items():
        if delta.ndim == 2:
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            delta = (U[:, :2] * S[:2] @ Vh[:2]).float()
        low[k] = base[k] + delta
    d = diagnose(_tv(base, _finetunes(base, deltas, rot90=low)), None, progress=False)
    assert _fired(d, "low_rank") == ["rot90"]
    value = d.checks[(d.checks["check"] == "low_rank") & (d.checks["task"] == "rot90")]["value"].iloc[0]
    assert value == pytest.approx(2 / 64)  # fc1.weight: 2 of min(512, 64) directions
