"""Evaluator: the batched vmap path equals per-alpha evaluation with an ordinary module forward."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlens import lmc
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


def mlp(width: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


def _init(factory, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():  # non-trivial BatchNorm statistics, different per endpoint
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference(factory, state, x, y):
    """Independent path: load_state_dict into a fresh module and call it; float64 cross-entropy."""
    model = factory()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out.double(), y)), float((out.argmax(1) == y).double().mean())


def _interp(a, b, alpha):
    return {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else a[k] for k in a}


@pytest.fixture(scope="module")
def cnn_data():
    gen = torch.Generator().manual_seed(5)
    return {
        "train": (torch.randn(70, 1, 8, 8, generator=gen), torch.randint(0, 10, (70,), generator=gen)),
        "test": (torch.randn(33, 1, 8, 8, generator=gen), torch.randint(0, 10, (33,), generator=gen)),
    }


def test_single_call_matches_module_forward():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 12, generator=gen), torch.randint(0, 5, (50,), generator=gen)
    state = _init(mlp, 1)
    ev = lmc.Evaluator(mlp(), (x, y), F.cross_entropy, batch_size=16)
    got = ev(state)
    loss, acc = _reference(mlp, state, x, y)
    assert set(got) == {"loss", "accuracy"}
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_batched_cnn_curve_matches_per_alpha_reference(cnn_data):
    a, b = _init(SmallCNN, 1), _init(SmallCNN, 2)
    ev = lmc.Evaluator(SmallCNN(), cnn_data, F.cross_entropy, batch_size=16, device="cpu", vectorize=True)
    batched = lmc.curve(a, b, ev, points=9)
    looped = lmc.curve(a, b, lambda sd: ev(sd), points=9)
    in_chunks = lmc.curve(a, b, lmc.Evaluator(SmallCNN(), cnn_data, batch_size=16, vectorize=False), points=9)
    for split, (x, y) in cnn_data.items():
        ref = np.array([_reference(SmallCNN, _interp(a, b, al), x, y) for al in batched.alphas])
        assert np.abs(batched.loss[split] - ref[:, 0]).max() < 1e-5
        assert np.abs(batched.accuracy[split] - ref[:, 1]).max() < 1e-12
        assert np.abs(batched.loss[split] - looped.loss[split]).max() < 1e-5
        assert np.array_equal(batched.accuracy[split], looped.accuracy[split])
        assert np.abs(in_chunks.loss[split] - ref[:, 0]).max() < 1e-5


def test_vectorize_auto_skips_vmap_only_for_convolutions_on_cpu(cnn_data):
    assert lmc.Evaluator(SmallCNN(), cnn_data, device="cpu").vectorize is False
    assert lmc.Evaluator(mlp(), cnn_data, device="cpu").vectorize is True
    with pytest.raises(InvalidParameterError, match="vectorize"):
        lmc.Evaluator(mlp(), cnn_data, vectorize="yes")


def test_chunking_and_dataloader_give_the_same_numbers(cnn_data):
    a, b = _init(SmallCNN, 3), _init(SmallCNN, 4)
    whole = lmc.curve(a, b, lmc.Evaluator(SmallCNN(), cnn_data, vectorize=True), points=7)
    tiny = lmc.Evaluator(SmallCNN(), cnn_data, max_bytes=1, vectorize=True)  # one model per pass
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*cnn_data["test"]), batch_size=10)
    from_loader = lmc.Evaluator(SmallCNN(), {"test": loader}, vectorize=True)
    assert tiny.chunk_size(tiny.prepare(a)) == 1
    chunked = lmc.curve(a, b, tiny, points=7)
    loaded = lmc.curve(a, b, from_loader, points=7)
    for split in cnn_data:
        assert np.abs(whole.loss[split] - chunked.loss[split]).max() < 1e-5
    assert np.abs(whole.loss["test"] - loaded.loss["test"]).max() < 1e-5
    assert np.array_equal(whole.accuracy["test"], loaded.accuracy["test"])


def test_a_loss_vmap_cannot_trace_falls_back_to_a_loop(cnn_data):
    a, b = _init(SmallCNN, 1), _init(SmallCNN, 2)

    def item_loss(out, y):  # .item() is not allowed under vmap
        return torch.tensor(F.cross_entropy(out, y).item())

    plain = lmc.curve(a, b, lmc.Evaluator(SmallCNN(), cnn_data, vectorize=True), points=5)
    fallback = lmc.curve(a, b, lmc.Evaluator(SmallCNN(), cnn_data, item_loss, vectorize=True), points=5)
    assert np.abs(plain.loss["test"] - fallback.loss["test"]).max() < 1e-6


def test_module_is_left_untouched(cnn_data):
    module = SmallCNN().train()
    before = copy.deepcopy(module.state_dict())
    ev = lmc.Evaluator(module, cnn_data)
    lmc.curve(_init(SmallCNN, 1), _init(SmallCNN, 2), ev, points=3)
    ev(_init(SmallCNN, 1))
    assert module.training and all(m.training for m in module.modules())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_regression_loss_has_no_accuracy():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 12, generator=gen), torch.randn(20, 5, generator=gen)
    state = _init(mlp, 1)
    got = lmc.Evaluator(mlp(), (x, y), F.mse_loss)(state)
    model = mlp()
    model.load_state_dict(state)
    with torch.no_grad():
        assert got["loss"] == pytest.approx(float(F.mse_loss(model(x), y)), rel=1e-6)
    assert np.isnan(got["accuracy"])


def test_errors_name_keys_and_shapes():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    ev = lmc.Evaluator(mlp(), (x, y))
    state = _init(mlp, 1)
    with pytest.raises(KeyMismatchError, match="missing keys '0.bias'"):
        ev({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(ShapeMismatchError, match=r"'0.weight'.*\(16, 12\), expected \(32, 12\)"):
        ev(_init(lambda: mlp(16), 1))
    with pytest.raises(InvalidParameterError, match="no targets"):
        lmc.Evaluator(mlp(), x)(state)
    with pytest.raises(InvalidParameterError, match="torch.nn.Module"):
        lmc.Evaluator("mlp", (x, y))
    with pytest.raises(InvalidParameterError, match="batch_size"):
        lmc.Evaluator(mlp(), (x, y), batch_size=0)
    assert "splits=['default']" in repr(ev)
