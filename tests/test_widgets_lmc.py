"""LMCExplorer without a browser: controls are set from code and the figure models must follow.

The explorer's numbers must be exactly those of ``weightlens.rebasin`` and ``weightlens.lmc`` (it
holds no math), and every figure update must also reach the widget's full synced state (a reload
would otherwise show a stale figure: pitfall P1 of the Jupyter recipe).
"""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import torch.nn.functional as F
from ipywidgets.widgets.widget import _remove_buffers
from test_rebasin_builders import make_mlp

from weightlens import lmc
from weightlens.errors import InvalidParameterError
from weightlens.rebasin import Permutations, mlp_spec, weight_matching
from weightlens.widgets.lmc import VIEWS, LMCExplorer


def _data(model: torch.nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.fixture(scope="module")
def setup():
    ma, mb = make_mlp(0), make_mlp(1)
    a, b = ma.state_dict(), mb.state_dict()
    ev = lmc.Evaluator(make_mlp(2), {"train": _data(ma, 200, 0), "test": _data(ma, 100, 1)}, F.cross_entropy)
    spec = mlp_spec(a)
    return a, b, ev, spec, LMCExplorer(a, b, ev, spec, points=9, k=6)  # k > 5 rows of the last layer


def test_numbers_come_from_rebasin_and_lmc(setup):
    a, b, ev, spec, x = setup
    assert x.permutations_.equals(weight_matching(a, b, spec))
    matched = lmc.curve(a, x.permutations_.apply(b), ev, points=9)
    assert np.array_equal(x.matched_.loss["test"], matched.loss["test"])
    assert np.array_equal(x.naive_.loss["train"], lmc.curve(a, b, ev, points=9).loss["train"])
    summary = x.children[0].value
    assert f"{x.naive_.barrier['test']:.4f}" in summary and f"{x.matched_.barrier['test']:.4f}" in summary
    assert "LMCExplorer(barrier naive -> matched" in repr(x)
    assert len(x.distances_) == 5 and set(x.alignment_.layers["key"]) == {"0.weight", "2.weight", "4.weight"}


def test_views_are_built_lazily_and_shown_on_demand(setup):
    *_, x = setup
    x.controls["view"].value = VIEWS[0]
    assert "interpolation" in x.figures
    kinds = {"layer distance": "bar", "permutations": "heatmap", "singular vectors": "heatmap",
             "interpolation": "scatter"}
    for view, kind in kinds.items():
        x.controls["view"].value = view
        shown = x._panel.children[0].children[-1]
        assert isinstance(shown, go.FigureWidget) and shown is x.figures[view] and shown.data[0].type == kind
    assert x.last_error is None
    for fig in x.figures.values():  # NaN would break the kernel's JSON messages
        state, _, _ = _remove_buffers(fig.get_state(key=["_widget_data", "_widget_layout"]))
        json.dumps(state, allow_nan=False)


def test_alpha_and_split_update_the_figure_and_its_synced_state(setup):
    *_, x = setup
    x.controls["view"].value = "interpolation"
    fig = x.figures["interpolation"]
    alpha = float(x.naive_.alphas[2])
    x.controls["alpha"].value = alpha
    assert [s.x0 for s in fig.layout.shapes if s.name == "alpha"] == [alpha, alpha]
    assert [s["x0"] for s in fig._widget_layout["shapes"]] == [alpha, alpha]
    assert f"loss {x.naive_.loss['test'][2]:.4f}" in x._readout.value
    n_traces = len(fig.data)
    x.controls["split"].value = "train"
    assert len(fig.data) == n_traces
    assert fig.data[0].name == f"naive (barrier {x.naive_.barrier['train']:.3g})"
    assert fig._widget_data[0]["name"] == fig.data[0].name
    assert list(fig.data[0].y) == pytest.approx(list(x.naive_.loss["train"]))
    assert "(train)" in x._readout.value
    x.controls["split"].value = "test"


def test_permutation_and_side_controls(setup):
    *_, x = setup
    x.controls["view"].value = "permutations"
    x.controls["permutation"].value = "2"
    z = np.asarray(x.figures["permutations"].data[0].z)
    assert np.array_equal(z.argmax(1), x.permutations_.perms["2"].numpy())
    assert x.figures["permutations"].layout.annotations[0].text.startswith("2: n=24")
    x.controls["view"].value = "singular vectors"
    x.controls["side"].value = "right"
    after = np.asarray(x.figures["singular vectors"].data[1].z)
    right = x.alignment_.vectors.query("side == 'right' and key == '0.weight'")["after"].to_numpy()
    assert np.allclose(after[0], right)


def test_callback_errors_are_shown_not_raised(setup, monkeypatch):
    *_, x = setup
    x.controls["view"].value = "interpolation"

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr("weightlens.widgets.lmc.figure_lmc", broken)
    x.controls["alpha"].value = float(x.naive_.alphas[1])
    assert isinstance(x.last_error, RuntimeError) and "figure failed" in x.status.value
    x.last_error = None


def test_given_permutations_and_a_plain_callable():
    ma, mb = make_mlp(0), make_mlp(1)
    a, b = ma.state_dict(), mb.state_dict()
    spec = mlp_spec(a)
    ev = lmc.Evaluator(make_mlp(2), _data(ma, 50, 0), F.cross_entropy)
    x = LMCExplorer(a, b, ev.__call__, spec, permutations=Permutations.identity(spec, a), points=5, k=2)
    assert x.naive_.splits == ["default"]
    assert np.array_equal(x.naive_.loss["default"], x.matched_.loss["default"])  # identity: nothing matched
    with pytest.raises(InvalidParameterError, match="PermutationSpec"):
        LMCExplorer(a, b, ev, {"0.weight": ("h", None)})


def test_results_given_are_shown_and_the_rest_is_measured_on_first_display(setup, monkeypatch):
    a, b, ev, spec, x = setup
    calls = []
    monkeypatch.setattr("weightlens.widgets.lmc.curve", lambda *args, **kw: calls.append("curve"))
    monkeypatch.setattr("weightlens.widgets.lmc.weight_matching", lambda *args, **kw: calls.append("matching"))
    y = LMCExplorer(a, b, None, spec, permutations=x.permutations_, naive=x.naive_, matched=x.matched_, k=6)
    assert calls == [] and y._distances is None and y._alignment is None  # nothing measured yet
    assert y.children[0].value == x.children[0].value
    y.controls["view"].value = "layer distance"
    assert y._distances is not None and y._alignment is None
    assert y.distances_.equals(x.distances_)
    y.controls["view"].value = "singular vectors"
    assert y.alignment_.layers.equals(x.alignment_.layers) and y.last_error is None
    with pytest.raises(InvalidParameterError, match="'evaluate'"):
        LMCExplorer(a, b, None, spec, naive=x.naive_)
    short = lmc.curve(a, b, ev, points=5)
    with pytest.raises(InvalidParameterError, match="same alphas"):
        LMCExplorer(a, b, None, spec, permutations=x.permutations_, naive=short, matched=x.matched_)


def test_the_widgets_package_exports_this_explorer():
    import weightlens as wl

    assert wl.widgets.LMCExplorer is LMCExplorer
