"""The report figures are built from the report tables: inspect the figure objects, no browser."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import weightlens as wl
from weightlens.analysis import analyze
from weightlens.errors import InvalidParameterError
from weightlens.figures.analysis import (
    figure_conflict_matrix,
    figure_cosines,
    figure_sar_layers,
    figure_sar_matrix,
    figure_sign_conflicts,
    figure_spectra,
    figure_subspace_overlap,
    report_page,
    task_colors,
)


@pytest.fixture(scope="module")
def report():
    g = torch.Generator().manual_seed(0)
    shapes = {f"blocks.{i}.{name}": s for i in range(3) for name, s in (("w", (10, 8)), ("b", (10,)))}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("x", "y", "z")}
    return analyze(wl.TaskVectors(base, fts), device="cpu", progress=False)


def test_task_colors_are_stable_and_fixed_for_sum():
    colors = task_colors(["a", "sum", "b", "merged"])
    assert colors["sum"] == "#222222" and colors["merged"] == "#8c8c8c"
    assert colors["a"] != colors["b"] and task_colors(["a", "b"]) == {k: colors[k] for k in "ab"}


def test_spectra_figure_is_log_scale_with_one_colour_per_task(report):
    fig = figure_spectra(report.singular_values, max_keys=2, cols=2)
    assert isinstance(fig, go.Figure)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert len(fig.data) == 2 * 4  # two layers x (3 tasks + sum)
    colors = {tr.name: tr.line.color for tr in fig.data}
    assert all(tr.line.color == colors[tr.name] for tr in fig.data)
    assert colors["sum"] == "#222222"
    assert sum(tr.showlegend for tr in fig.data) == 4  # legend entry once per task
    first = fig.data[0]
    want = report.singular_values.query("key == 'blocks.0.w' and task == @first.name").sort_values("index")["sigma"]
    np.testing.assert_allclose(np.asarray(first.y, dtype=float), want.to_numpy())
    norm = figure_spectra(report.singular_values, keys=["blocks.1.w"], normalize=True)
    assert max(max(tr.y) for tr in norm.data) == pytest.approx(1.0)


def test_alignment_heatmaps_show_the_report_numbers(report):
    m = report.sar_matrix()
    fig = figure_sar_matrix(m)
    hm = fig.data[0]
    assert hm.type == "heatmap" and list(hm.x) == ["x", "y", "z", "sum"] and list(hm.y) == ["x", "y", "z"]
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float), m.to_numpy(dtype=float))
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    layers = figure_sar_layers(report.alignment, reference="sum").data[0]
    assert list(layers.y) == ["blocks.0.w", "blocks.1.w", "blocks.2.w"] and list(layers.x) == ["x", "y", "z"]
    want = report.alignment.set_index(["key", "task", "reference"]).loc[("blocks.2.w", "y", "sum"), "sar"]
    assert layers.z[2][1] == pytest.approx(want)


def test_cosine_heatmap_is_symmetric_and_centred(report):
    hm = figure_cosines(report.cosines).data[0]
    z = np.asarray(hm.z, dtype=float)
    np.testing.assert_allclose(z, z.T)
    np.testing.assert_allclose(np.diag(z), 1.0)
    np.testing.assert_allclose(z, report.cosines.to_numpy())
    assert hm.zmid == 0.0 and hm.zmin == -hm.zmax


def test_conflict_matrix_heatmap_is_centred_on_chance(report):
    m = report.conflict_matrix()
    hm = figure_conflict_matrix(m).data[0]
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float), m.to_numpy(dtype=float))
    assert hm.zmid == 0.5 and (hm.zmin, hm.zmax) == (0.0, 1.0) and list(hm.x) == ["x", "y", "z"]


def test_sign_conflicts_by_layer_with_the_chance_line(report):
    fig = figure_sign_conflicts(report.signs)
    bars, mass, chance = fig.data
    assert list(bars.x) == ["blocks.0", "blocks.1", "blocks.2"]
    s = report.signs.query("block == 'blocks.1'")
    assert bars.y[1] == pytest.approx(s.n_conflict.sum() / s.n_eligible.sum())
    assert chance.line.dash == "dash" and np.allclose(chance.y, 1 - 2.0 ** (1 - 3))
    by_key = figure_sign_conflicts(report.signs, by="key")
    assert len(by_key.data[0].x) == len(report.signs)
    with pytest.raises(InvalidParameterError, match="'block' or 'key'"):
        figure_sign_conflicts(report.signs, by="layer")


def test_subspace_overlap_has_a_line_per_pair_and_chance(report):
    fig = figure_subspace_overlap(report.pairs)
    assert [tr.name for tr in fig.data] == ["x / y", "x / z", "y / z", "chance k/d"]
    assert np.allclose(fig.data[-1].y, report.pairs.dropna(subset=["chance_left"])["chance_left"].iloc[0])


def test_report_page_inlines_plotly_once():
    figs = {"a": go.Figure(go.Scatter(y=[1, 2])), "b": go.Figure(go.Bar(y=[3]))}
    page = report_page("T <1>", pd.DataFrame({"v": [1.0]}), pd.DataFrame({"w": [2.0]}), figs, settings={"eps": 0.05})
    assert page.count("Plotly.newPlot") == 2 and "T &lt;1&gt;" in page and "eps=0.05" in page
    assert len(page) > 1_000_000 and "<script src" not in page
