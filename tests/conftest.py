"""Shared fixtures: the real model zoo at CI size, built once per test session.

The zoo is cached where ``weightlens.zoo.home()`` says (``$WEIGHTLENS_HOME``, else ``~/.cache/weightlens``;
``./dev.sh test`` sets nothing of its own); builds are deterministic and skipped when present.
"""

from __future__ import annotations

import pytest

from weightlens import zoo

PAIR_WIDTHS_CI = (16, 128, 512)


@pytest.fixture(scope="session")
def digits_zoo():
    """Base MLP on digits and 4 fine-tunes on transformed digits (``TaskZoo``)."""
    zoo.build(size="ci", names=["digits-tasks"], progress=False)
    return zoo.load("digits-tasks", size="ci")


@pytest.fixture(scope="session")
def digits_pairs():
    """``{width: PairZoo}``: independently trained digits MLPs at the CI widths."""
    zoo.build(size="ci", names=["digits-pairs"], progress=False)
    return {w: zoo.load("digits-pairs", size="ci", width=w) for w in PAIR_WIDTHS_CI}


@pytest.fixture(scope="session")
def minilm_zoo():
    """all-MiniLM-L6-v2 and 4 fine-tunes on WordNet and fortunes tasks (``TaskZoo``)."""
    zoo.build(size="ci", names=["minilm-tasks"], progress=False)
    return zoo.load("minilm-tasks", size="ci")


@pytest.fixture(scope="session")
def minilm_lora():
    """all-MiniLM-L6-v2 and 4 LoRA adapters (peft) on the minilm-tasks tasks, same heads (``TaskZoo``)."""
    pytest.importorskip("peft")
    zoo.build(size="ci", names=["minilm-lora"], progress=False)
    return zoo.load("minilm-lora", size="ci")


@pytest.fixture(scope="session")
def digits_merges(digits_zoo):
    """``{model: {task: normalized test accuracy}}`` of the digits zoo's base, task arithmetic at its default and the
    data-based ``regmean`` and ``fisher`` at theirs (``zoo.merge_data()``): shared by their tests."""
    from weightlens.merge import merge

    tv, data = digits_zoo.task_vectors(), digits_zoo.merge_data()
    ft = {t: digits_zoo.evaluate(tv.finetuned_weights(t), t, "test")["accuracy"] for t in tv.names}
    methods = ("task_arithmetic", "regmean", "fisher")
    models = {"base": tv.base, **{m: merge(tv, method=m, data=data, device="cpu") for m in methods}}
    return {m: {t: digits_zoo.evaluate(w, t, "test")["accuracy"] / ft[t] for t in tv.names} for m, w in models.items()}
