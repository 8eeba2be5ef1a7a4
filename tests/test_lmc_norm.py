"""BatchNorm reset and REPAIR checked against statistics computed by hand from the layers' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlens import lmc
from weightlens.errors import InvalidParameterError


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)  # must stay off while statistics are collected
        self.fc = nn.Linear(6 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.avg_pool2d(x, 2).flatten(1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _state(factory, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.3, 3.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mid(a, b, alpha=0.5):
    return {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else a[k] for k in a}


class Counting:
    """A re-iterable loader that records every batch handed out."""

    def __init__(self, batches):
        self.batches, self.served = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.served += 1
            yield batch


# ------------------------------------------------------------------------------ BatchNorm reset


def _expected_bn(state, batches):
    """PyTorch's cumulative average (momentum=None): mean of per-batch means and unbiased variances."""
    means, variances = [], []
    for x in batches:
        z = F.conv2d(x.double(), state["conv1.weight"].double(), state["conv1.bias"].double(), padding=1)
        means.append(z.mean((0, 2, 3)))
        variances.append(z.var((0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_reset_recomputes_statistics_from_exactly_the_given_batches():
    a, b = _state(BNNet, 1), _state(BNNet, 2)
    mid = _mid(a, b)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 1, 8, 8, generator=gen) + 0.3 for n in (16, 16, 9)]
    module = BNNet().train()
    module.bn1.momentum = 0.1
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = Counting(batches)
    fresh = lmc.reset_batchnorm(module, mid, loader)
    mean, var = _expected_bn(mid, batches)
    assert loader.served == 3 and int(fresh["bn1.num_batches_tracked"]) == 3
    assert torch.allclose(fresh["bn1.running_mean"].double(), mean, atol=1e-5)
    assert torch.allclose(fresh["bn1.running_var"].double(), var, atol=1e-5)
    # interpolated statistics are not the statistics of the interpolated network
    assert (mid["bn1.running_mean"] - fresh["bn1.running_mean"]).abs().max() > 0.05
    assert (mid["bn1.running_var"] - fresh["bn1.running_var"]).abs().max() > 0.05
    # other data -> other statistics, again exactly those of the data given
    fewer = lmc.reset_batchnorm(module, mid, batches[:2])
    mean2, _ = _expected_bn(mid, batches[:2])
    assert torch.allclose(fewer["bn1.running_mean"].double(), mean2, atol=1e-5)
    assert not torch.allclose(fewer["bn1.running_mean"], fresh["bn1.running_mean"])
    # inputs untouched: the module, its momentum and flags, and the given state dict
    assert module.bn1.momentum == 0.1 and module.training and module.drop.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert torch.equal(mid["bn1.running_mean"], _mid(a, b)["bn1.running_mean"])
    for key in ("conv1.weight", "bn1.weight", "fc.bias"):
        assert torch.equal(fresh[key], mid[key])


def test_curve_with_bn_loader_matches_the_documented_procedure():
    a, b = _state(BNNet, 3), _state(BNNet, 4)
    gen = torch.Generator().manual_seed(1)
    bn_batches = [torch.randn(20, 1, 8, 8, generator=gen) for _ in range(2)]
    x, y = torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    ev = lmc.Evaluator(BNNet(), (x, y))
    c = lmc.curve(a, b, ev, points=5, bn_loader=bn_batches)
    assert c.normalization == "bn_reset" and c.label == "BN reset"
    naive = lmc.curve(a, b, ev, points=5)
    for i, alpha in enumerate(c.alphas):  # plain PyTorch: load, momentum=None, reset, train forward, eval
        model = BNNet()
        model.load_state_dict(_mid(a, b, alpha))
        model.bn1.momentum = None
        model.bn1.reset_running_stats()
        model.eval()
        model.bn1.train()
        with torch.no_grad():
            for xb in bn_batches:
                model(xb)
            model.eval()
            expected = float(F.cross_entropy(model(x).double(), y))
        assert c.loss["default"][i] == pytest.approx(expected, abs=1e-5)
    assert np.abs(c.loss["default"] - naive.loss["default"]).max() > 1e-3


# ------------------------------------------------------------------------------ REPAIR


def _mlp_preacts(state, x):
    """Hand forward of the MLP: pre-activations of layers '0' and '2', float64."""
    s = {k: v.double() for k, v in state.items()}
    h0 = x.double() @ s["0.weight"].T + s["0.bias"]
    h2 = torch.relu(h0) @ s["2.weight"].T + s["2.bias"]
    return {"0": h0, "2": h2}


def _conv_preacts(state, x):
    s = {k: v.double() for k, v in state.items()}
    c1 = F.conv2d(x.double(), s["conv1.weight"], s["conv1.bias"], padding=1)
    c2 = F.conv2d(torch.relu(c1), s["conv2.weight"], s["conv2.bias"], padding=1)
    return {"conv1": c1.transpose(0, 1).flatten(1).T, "conv2": c2.transpose(0, 1).flatten(1).T}


@pytest.mark.parametrize(
    ("factory", "preacts", "shape", "layers"),
    [(mlp, _mlp_preacts, (300, 12), ["0", "2"]), (ConvNet, _conv_preacts, (60, 2, 6, 6), ["conv1", "conv2"])],
    ids=["mlp", "conv"],
)
def test_repair_restores_interpolated_endpoint_statistics(factory, preacts, shape, layers):
    a, b = _state(factory, 10), _state(factory, 11)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 1.5 + 0.2
    alpha = 0.5
    assert lmc.repair_layers(factory()) == layers
    pa, pb = preacts(a, x), preacts(b, x)
    mid = _mid(a, b, alpha)
    stats = [lmc.channel_stats(factory(), s, x) for s in (a, b)]
    repaired = lmc.repair(factory(), mid, lmc.mix_stats(stats, [1 - alpha, alpha]), x)
    before, after = preacts(mid, x), preacts(repaired, x)
    for name in layers:
        target_mean = (1 - alpha) * pa[name].mean(0) + alpha * pb[name].mean(0)
        target_std = (1 - alpha) * pa[name].std(0, unbiased=False) + alpha * pb[name].std(0, unbiased=False)
        assert torch.allclose(stats[0][name].mean, pa[name].mean(0), atol=1e-5)
        assert torch.allclose(after[name].mean(0), target_mean, atol=1e-4)
        assert torch.allclose(after[name].std(0, unbiased=False), target_std, rtol=1e-4, atol=1e-5)
        # variance collapse was real before the repair
        assert (before[name].std(0, unbiased=False) / target_std).mean() < 0.95


def test_repair_at_an_endpoint_changes_nothing():
    a, b = _state(mlp, 10), _state(mlp, 11)
    x = torch.randn(100, 12, generator=torch.Generator().manual_seed(3))
    stats = [lmc.channel_stats(mlp(), s, x) for s in (a, b)]
    repaired = lmc.repair(mlp(), a, lmc.mix_stats(stats, [1.0, 0.0]), x)
    for key, value in a.items():
        assert torch.allclose(repaired[key], value, atol=1e-6), key


def test_repair_curve_needs_layers_with_a_bias_and_known_names():
    x = torch.randn(30, 12)
    state = _state(mlp, 1)
    stats = lmc.channel_stats(mlp(), state, x)
    no_bias = {k: v for k, v in state.items() if k != "2.bias"}
    with pytest.raises(InvalidParameterError, match="'2.bias'"):
        lmc.repair(mlp(), no_bias, stats, x)
    with pytest.raises(InvalidParameterError, match="not a Linear or Conv"):
        lmc.channel_stats(mlp(), state, x, layers=["1"])


def test_curve_with_repair_uses_the_repair_settings():
    a, b = _state(mlp, 5), _state(mlp, 6)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(80, 12, generator=gen), torch.randint(0, 5, (80,), generator=gen)
    ev = lmc.Evaluator(mlp(), {"train": (x, y)})
    c = lmc.curve(a, b, ev, points=3, repair=lmc.Repair(x, layers=["0"]))
    stats = [lmc.channel_stats(mlp(), s, x, layers=["0"]) for s in (a, b)]
    expected = lmc.repair(mlp(), _mid(a, b), lmc.mix_stats(stats, [0.5, 0.5]), x)
    assert c.loss["train"][1] == pytest.approx(ev(expected)["train"]["loss"], abs=1e-6)
    assert c.normalization == "repair" and c.endpoints[0] != c.endpoints[1]


def test_one_shot_generators_serve_every_alpha():
    a, b = _state(BNNet, 3), _state(BNNet, 4)
    gen = torch.Generator().manual_seed(1)
    bn_batches = [torch.randn(20, 1, 8, 8, generator=gen) for _ in range(2)]
    x, y = torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    ev = lmc.Evaluator(BNNet(), (x, y))
    from_list = lmc.curve(a, b, ev, points=3, bn_loader=bn_batches)
    from_generator = lmc.curve(a, b, ev, points=3, bn_loader=(xb for xb in bn_batches))
    assert np.abs(from_list.loss["default"] - from_generator.loss["default"]).max() < 1e-6
