"""The LMC figure builder: traces per curve and split, chords through the endpoint values."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from weightlens.errors import InvalidParameterError
from weightlens.figures.lmc import figure_lmc, lmc_frame
from weightlens.lmc import LMCCurve

ALPHAS = np.linspace(0, 1, 5)


def _curve(label: str, bump: float) -> LMCCurve:
    loss = 0.2 + 0.1 * ALPHAS + bump * ALPHAS * (1 - ALPHAS) * 4
    acc = 0.95 - bump * ALPHAS * (1 - ALPHAS)
    metrics = {s: {"loss": loss * k, "accuracy": acc} for s, k in (("train", 1.0), ("test", 1.2))}
    return LMCCurve(ALPHAS, metrics, label=label)


def test_naive_and_matched_are_overlaid_with_chords():
    fig = figure_lmc([_curve("naive", 0.5), _curve("matched", 0.01)], title="digits h=128")
    assert isinstance(fig, go.Figure) and fig.layout.title.text == "digits h=128"
    curves = [t for t in fig.data if t.mode == "lines+markers"]
    chords = [t for t in fig.data if t.mode == "lines"]
    assert len(curves) == 2 * 2 * 2 and len(chords) == len(curves)  # 2 labels x 2 splits x 2 metrics
    naive_test = next(t for t in curves if t.name.startswith("naive · test") and t.xaxis == "x")
    assert "barrier 0.6" in naive_test.name  # 0.5 * 1.2 above the chord at alpha 1/2
    chord = next(t for t in chords if t.legendgroup == "naive|test" and t.xaxis == "x")
    assert list(chord.x) == [0.0, 1.0] and list(chord.y) == pytest.approx([0.24, 0.36])
    colours = {t.line.color for t in curves if t.name.startswith("naive")}
    assert len(colours) == 1 and {t.line.dash for t in curves if t.name.startswith("naive")} == {"solid", "dot"}


def test_mapping_relabels_and_options_select():
    fig = figure_lmc({"before": _curve("x", 0.5), "after": _curve("y", 0.0)}, metrics=["loss"], splits=["test"],
                     chord=False)
    assert [t.name.split(" (")[0] for t in fig.data] == ["before", "after"]
    frame = lmc_frame({"before": _curve("x", 0.5)})
    assert set(frame["label"]) == {"before"} and len(frame) == 2 * 2 * 5
    assert len(figure_lmc(frame).data) == 2 * 2 * 2


def test_bad_inputs_raise():
    with pytest.raises(InvalidParameterError, match="Unknown metrics"):
        figure_lmc(_curve("a", 0.1), metrics=["perplexity"])
    with pytest.raises(InvalidParameterError, match="splits"):
        figure_lmc(_curve("a", 0.1), splits=["val"])
    with pytest.raises(InvalidParameterError, match="LMCCurve"):
        figure_lmc(42)
    with pytest.raises(InvalidParameterError, match="no curves"):
        figure_lmc([])


def test_alpha_marker_in_every_panel():
    fig = figure_lmc([_curve("naive", 0.5)], alpha=0.25)
    lines = [s for s in fig.layout.shapes if s.name == "alpha"]
    assert len(lines) == 2 and all(s.x0 == s.x1 == 0.25 for s in lines)
    assert {s.xref for s in lines} == {"x", "x2"}
    assert not figure_lmc([_curve("naive", 0.5)]).layout.shapes
    with pytest.raises(InvalidParameterError, match="'alpha'"):
        figure_lmc(_curve("a", 0.1), alpha=1.5)
