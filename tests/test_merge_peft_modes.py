"""``peft_cat`` and ``peft_svd`` against peft's own ``add_weighted_adapter`` (run live on the same adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightlens as wl
from weightlens.merge import get_method, merge

CPU = {"device": "cpu"}
MODULES = {"lin": (12, 10), "out": (6, 12)}


def write_adapter(folder: Path, base: dict, modules: dict, r: int, alpha: float, g: torch.Generator) -> Path:
    """A PEFT LoRA adapter folder with random factors (``lora_B`` nonzero) on ``modules`` (``{name: (out, in)}``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (m, n) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, n, generator=g) / n ** 0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, r, generator=g) / r ** 0.5
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "init_lora_weights": True, "base_model_name_or_path": None, "task_type": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(10, 12)
        self.out = torch.nn.Linear(12, 6)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapters of ranks 2, 3, 4 (scales 2, 1.5, 0.5) and the base weights they were written for."""
    root = tmp_path_factory.mktemp("peft_modes")
    torch.manual_seed(0)
    net = _Net()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    paths = {f"a{i}": write_adapter(root / f"a{i}", base, MODULES, r, alpha, g)
             for i, (r, alpha) in enumerate(((2, 4), (3, 4.5), (4, 2)))}
    return net, base, paths


def _peft_delta(adapters, combination_type: str, weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    """peft's merged adapter's update per base key: ``add_weighted_adapter`` then ``get_delta_weight``."""
    peft = pytest.importorskip("peft")
    net, base, paths = adapters
    fresh = _Net()
    fresh.load_state_dict(base)
    names = list(paths)
    model = peft.PeftModel.from_pretrained(fresh, str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    model.base_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    inner = model.base_model.model
    return {f"{m}.weight": getattr(inner, m).get_delta_weight("merged").detach() for m in MODULES}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> float:
    err = float((got.double() - want.double()).abs().max()) / float(want.abs().max())
    assert err <= rel, f"relative error {err:.3g} > {rel}"
    return err


@pytest.fixture(scope="module")
def tv(adapters):
    return wl.TaskVectors(adapters[1], adapters[2])


@pytest.mark.parametrize("weight", [1.0, 0.7, -0.4])
def test_cat_equals_peft(adapters, tv, weight):
    want = _peft_delta(adapters, "cat", [weight] * 3)
    got = merge(tv, method="peft_cat", alpha=weight, **CPU)
    for key, ref in want.items():
        _close(got.update(key), ref)
        svd = got.update_svd(key)  # its own factors: rank 9 of the concatenation, completed with zeros
        assert int((svd.S > 0).sum()) == min(9, *ref.shape)
    assert not got.update("lin.bias").any()
    assert get_method("peft_cat").mergekit({"alpha": weight}).method == "task_arithmetic"


@pytest.mark.parametrize("weight, rank", [(1.0, None), (0.7, None), (1.3, 2), (-0.5, 6)])
def test_svd_equals_peft(adapters, tv, weight, rank):
    """The default rank is the adapters' largest r (4); the sum has rank 9, so the truncation matters."""
    want = _peft_delta(adapters, "svd", [weight] * 3, svd_rank=rank)
    got = merge(tv, method="peft_svd", rank=rank, alpha=weight, **CPU)
    for key, ref in want.items():
        _close(got.update(key), ref)
        k = rank or 4
        assert int((got.update_svd(key).S > 1e-6 * float(got.update_svd(key).S[0])).sum()) == min(k, 6)
    assert got.notes.empty


@pytest.mark.parametrize("clamp, rank", [(0.9, None), (0.75, 3), (0.99, 6)])
def test_svd_clamp_equals_peft(adapters, tv, clamp, rank):
    """The clamp bounds the signed entries of U S and Vh by their quantile: peft's own SVD call, same signs."""
    want = _peft_delta(adapters, "svd", [1.0] * 3, svd_rank=rank, svd_clamp=clamp)
    got = merge(tv, method="peft_svd", rank=rank, clamp=clamp, alpha=1.0, **CPU)
    plain = merge(tv, method="peft_svd", rank=rank, alpha=1.0, **CPU)
    for key, ref in want.items():
        _close(got.update(key), ref)
        assert float((plain.update(key) - ref).abs().max()) > 1e-4 * float(ref.abs().max())  # the clamp bites


def test_dense_task_vectors():
    """Full fine-tunes: cat is task arithmetic; svd's default rank is the tasks' largest numerical rank."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(5, 4), "b": torch.zeros(4)}
    tv = wl.TaskVectors(base, {t: {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}
                               for t in ("x", "y")})
    total = tv.deltas("w").sum(0)
    _close(merge(tv, method="peft_cat", **CPU).update("w"), total, 1e-6)
    full = merge(tv, method="peft_svd", **CPU)
    _close(full.update("w"), total)
    assert full.notes.empty
    U, S, Vh = torch.linalg.svd(total.double())
    _close(merge(tv, method="peft_svd", rank=2, **CPU).update("w"), (U[:, :2] * S[:2]) @ Vh[:2])
    torch.testing.assert_close(merge(tv, method="peft_svd", rank=2, **CPU).update("b"), tv.deltas("b").sum(0))


def test_svd_clamp_of_conv1d_adapters_equals_peft(tmp_path):
    """GPT-2 Conv1D layers (``fan_in_fan_out``): peft decomposes the update transposed, which changes the clamp's
    quantile (it is taken over ``U S`` and ``Vh``, not symmetric in them); ``peft_svd`` does the same."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import warnings

    import _hf_models as hf
    import _peft_models as pm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2 = hf.tiny_gpt2(tmp_path)
        config = peft.LoraConfig(r=3, lora_alpha=6, fan_in_fan_out=True, target_modules=["c_attn"])
        paths = {f"g{i}": pm.train_adapter(gpt2, tmp_path / f"g{i}", config, seed=i) for i in range(2)}
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(gpt2),
                                               str(paths["g0"]), adapter_name="g0")
        model.load_adapter(str(paths["g1"]), adapter_name="g1")
        model.base_model.add_weighted_adapter(["g0", "g1"], [1.0, 1.0], "merged", combination_type="svd",
                                              svd_clamp=0.8)
    want = {f"{name}.weight": module.get_delta_weight("merged").detach()
            for name, module in model.base_model.model.named_modules()
            if hasattr(module, "lora_A") and "merged" in module.lora_A}
    assert want
    tv = wl.TaskVectors(gpt2, paths)
    got = merge(tv, method="peft_svd", clamp=0.8, **CPU)
    for key, ref in want.items():
        _close(got.update(key), ref)
