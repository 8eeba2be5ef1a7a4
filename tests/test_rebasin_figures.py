"""What matching did, as tables and figures: layer distances, singular-vector alignment, permutation heatmaps.

Tables are checked against independent float64 computations (explicitly permuted tensors, NumPy SVD)
and planted permutations; figures are checked by inspecting their traces.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from test_rebasin_builders import VGG, make_mlp, randomize

from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.figures.rebasin import (
    figure_barriers,
    figure_layer_distances,
    figure_permutations,
    figure_singular_alignment,
    permutation_blocks,
)
from weightlens.rebasin import Permutations, layer_distances, mlp_spec, singular_alignment, vgg_spec, weight_matching


@pytest.fixture(scope="module")
def pair():
    """Two independent MLPs, their spec and the permutations weight matching finds."""
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    spec = mlp_spec(a)
    return a, b, spec, weight_matching(a, b, spec)


# ------------------------------------------------------------------------------------ tables


def test_layer_distances_match_explicit_permutation(pair):
    a, b, spec, perms = pair
    d = layer_distances(a, b, spec, perms).set_index("key")
    pb = perms.apply(b)
    assert list(d.index) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]  # 4.bias: nothing permuted
    for key in d.index:
        ta, tb = a[key].double(), b[key].double()
        assert d.at[key, "before"] == pytest.approx(float((ta - tb).norm()), rel=1e-12)
        assert d.at[key, "after"] == pytest.approx(float((ta - pb[key].double()).norm()), rel=1e-12)
        scale = float((ta.norm() ** 2 + tb.norm() ** 2).sqrt())
        assert d.at[key, "relative_after"] == pytest.approx(d.at[key, "after"] / scale, rel=1e-12)
    assert list(d["kind"]) == ["matrix", "vector", "matrix", "vector", "matrix"]
    total_before = sum(d["before"] ** 2)
    assert sum(d["after"] ** 2) < total_before  # matching maximises <a, pi(b)>: the total distance drops


def test_planted_permutation_gives_zero_distance_and_perfect_alignment():
    model = randomize(VGG(), 0)
    a = model.state_dict()
    spec = vgg_spec(a)
    planted = Permutations.random(spec, a, seed=4)
    b = planted.apply(a)
    d = layer_distances(a, b, spec, planted.inverse())
    assert (d["after"] == 0).all() and (d["before"] > 0).all() and (d["reduction"] == 1).all()
    al = singular_alignment(a, b, spec, planted.inverse(), k=4)
    assert set(al.layers["key"]) == {k for k in spec.keys if a[k].ndim >= 2}
    assert np.allclose(al.vectors["after"], 1.0, atol=1e-6)
    assert np.allclose(al.layers["overlap_after"], 1.0, atol=1e-6)
    conv = al.layers[(al.layers["key"] == "features.4.weight") & (al.layers["side"] == "right")]
    assert int(conv["dim"].iloc[0]) == a["features.4.weight"][0].numel()  # in * kh * kw
    assert al.layers["overlap_before"].min() < 0.9


def test_singular_alignment_matches_numpy_svd_of_the_permuted_matrix(pair):
    a, b, spec, perms = pair
    al = singular_alignment(a, b, spec, perms, k=5, device="cpu")
    pb = perms.apply(b)
    for key in ("0.weight", "2.weight"):
        ua, sa, vta = np.linalg.svd(a[key].double().numpy(), full_matrices=False)
        ub, _, vtb = np.linalg.svd(b[key].double().numpy(), full_matrices=False)
        up, _, vtp = np.linalg.svd(pb[key].double().numpy(), full_matrices=False)
        rows = al.vectors[al.vectors["key"] == key]
        left, right = rows[rows["side"] == "left"], rows[rows["side"] == "right"]
        assert np.allclose(left["sigma_a"], sa[:5])
        assert np.allclose(left["before"], np.abs((ua[:, :5] * ub[:, :5]).sum(0)), atol=1e-8)
        assert np.allclose(left["after"], np.abs((ua[:, :5] * up[:, :5]).sum(0)), atol=1e-8)
        assert np.allclose(right["after"], np.abs((vta[:5] * vtp[:5]).sum(1)), atol=1e-8)
        overlap = np.square(ua[:, :5].T @ up[:, :5]).sum() / 5
        layer = al.layers[(al.layers["key"] == key) & (al.layers["side"] == "left")]
        assert float(layer["overlap_after"].iloc[0]) == pytest.approx(overlap, abs=1e-8)
    inputs = al.layers[(al.layers["key"] == "0.weight") & (al.layers["side"] == "right")]
    assert float(inputs["overlap_before"].iloc[0]) == float(inputs["overlap_after"].iloc[0])  # inputs fixed


def test_diagnostics_validate_inputs(pair):
    a, b, spec, perms = pair
    with pytest.raises(KeyMismatchError, match="nope"):
        layer_distances(a, b, spec, perms, keys=["nope"])
    with pytest.raises(InvalidParameterError, match="'k'"):
        singular_alignment(a, b, spec, perms, k=0)
    with pytest.raises(InvalidParameterError, match="Permutations"):
        layer_distances(a, b, spec, {"0": torch.arange(32)})
    d = layer_distances(a, b, spec)
    assert np.allclose(d["before"], d["after"])  # no permutations: identity


# ------------------------------------------------------------------------------------ figures


def test_figure_layer_distances_draws_before_and_after(pair):
    a, b, spec, perms = pair
    d = layer_distances(a, b, spec, perms)
    fig = figure_layer_distances(d, title="t")
    assert isinstance(fig, go.Figure) and [t.name for t in fig.data] == ["before", "after"]
    assert list(fig.data[1].y) == pytest.approx(list(d["relative_after"]))
    assert fig.layout.shapes[0].y0 == 1.0  # the "unrelated" line
    raw = figure_layer_distances(d, relative=False, kinds=["matrix"])
    assert list(raw.data[0].x) == ["0.weight", "2.weight", "4.weight"] and not raw.layout.shapes
    with pytest.raises(InvalidParameterError, match="lacks columns"):
        figure_layer_distances(d.drop(columns=["after"]), relative=False)
    with pytest.raises(InvalidParameterError, match="kinds"):
        figure_layer_distances(d, kinds=["conv"])


def test_permutation_heatmaps_and_blocks(pair):
    *_, perms = pair
    fig = figure_permutations(perms)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]  # one per hidden layer: "0", "2"
    z = np.asarray(fig.data[0].z)
    p = perms.perms["0"].numpy()
    assert z.shape == (32, 32) and np.array_equal(np.argmax(z, axis=1), p) and z.sum() == 32
    assert "n=32" in fig.layout.annotations[0].text and "moved" in fig.layout.annotations[0].text
    ident = figure_permutations({"x": np.arange(300)}, max_cells=100)
    zb = np.asarray(ident.data[0].z)
    assert zb.shape == (100, 100) and np.array_equal(np.diag(zb), np.full(100, 3.0)) and zb.sum() == 300
    assert "3x3 blocks" in ident.layout.annotations[0].text and "0% moved" in ident.layout.annotations[0].text
    one = figure_permutations(perms, names=["2"])
    assert len(one.data) == 1
    with pytest.raises(InvalidParameterError, match="Unknown permutations"):
        figure_permutations(perms, names=["zzz"])
    with pytest.raises(InvalidParameterError, match="permutation of 0..n-1"):
        permutation_blocks([0, 0, 1])


def test_figure_singular_alignment_before_and_after(pair):
    a, b, spec, perms = pair
    al = singular_alignment(a, b, spec, perms, k=4)
    fig = figure_singular_alignment(al, side="left")
    before, after = fig.data
    assert before.type == after.type == "heatmap" and (before.zmin, before.zmax) == (0.0, 1.0)
    assert np.asarray(after.z).shape == (3, 4)
    expected = al.vectors.query("key == '2.weight' and side == 'left'")["after"].to_numpy()
    assert np.allclose(np.asarray(after.z)[1], expected)
    assert "→" in after.y[0]  # the row label carries the subspace overlap before -> after
    plain = figure_singular_alignment(al.vectors, side="right")  # a bare table works too
    assert list(plain.data[0].y) == ["0.weight", "2.weight", "4.weight"]
    with pytest.raises(InvalidParameterError, match="'side'"):
        figure_singular_alignment(al, side="up")


def test_figure_barriers_per_width():
    frame = pd.DataFrame({"width": [16, 128, 512] * 2, "label": ["naive"] * 3 + ["matched"] * 3,
                          "split": "test", "barrier": [1.1, 0.5, 0.3, 0.15, 0.01, 0.0]})
    fig = figure_barriers(frame, split="test")
    assert [t.name for t in fig.data] == ["naive", "matched"]
    assert list(fig.data[1].y) == [0.15, 0.01, 0.0] and fig.layout.xaxis.type == "log"
    with pytest.raises(InvalidParameterError, match="'split'"):
        figure_barriers(frame, split="val")
