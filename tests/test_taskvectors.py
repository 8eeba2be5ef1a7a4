"""TaskVectors: key validation, parameter classes, fp32 deltas, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import weightlens as wl
from weightlens.taskvectors import parameter_kind


def _model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(10, 4, generator=g).to(dtype),
        "layer.weight": torch.randn(6, 4, generator=g).to(dtype),
        "layer.bias": torch.randn(6, generator=g).to(dtype),
        "conv.weight": torch.randn(3, 2, 3, 3, generator=g).to(dtype),
        "norm.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def test_parameter_kinds_follow_ndim_and_dtype():
    assert parameter_kind((6, 4), torch.float32) == "matrix"
    assert parameter_kind((6,), torch.bfloat16) == "vector"
    assert parameter_kind((), torch.float32) == "vector"
    assert parameter_kind((3, 2, 3, 3), torch.float16) == "conv"
    assert parameter_kind((5,), torch.int64) == "skip"
    assert parameter_kind((5, 5), torch.bool) == "skip"


def test_delta_is_finetuned_minus_base_for_every_task_and_key():
    base, a, b = _model(0), _model(1), _model(2)
    tv = wl.TaskVectors(base, {"a": a, "b": b})
    assert tv.names == ["a", "b"] and len(tv) == 2
    assert "norm.num_batches_tracked" not in tv.keys  # integer buffers are skipped
    assert tv.keys == ["embed.weight", "layer.weight", "layer.bias", "conv.weight"]
    for key in tv.keys:
        torch.testing.assert_close(tv.delta("a", key), a[key] - base[key], rtol=0, atol=0)
        stacked = tv.deltas(key)
        assert stacked.shape == (2, *base[key].shape) and stacked.dtype == torch.float32
        torch.testing.assert_close(stacked[1], b[key] - base[key], rtol=0, atol=0)
    assert tv.keys_of_kind("matrix") == ["embed.weight", "layer.weight"]
    assert tv.keys_of_kind("conv") == ["conv.weight"]
    assert tv.numel("conv.weight") == 54


def test_low_precision_inputs_are_upcast_before_subtracting():
    base = {"w": torch.full((4, 4), 1000.0, dtype=torch.bfloat16)}
    ft = {"w": torch.full((4, 4), 1008.0, dtype=torch.bfloat16)}  # representable in bf16
    d = wl.TaskVectors(base, [ft]).delta("task0", "w")
    assert d.dtype == torch.float32
    # Exact fp32 difference of the two bf16 values, not a bf16 rounding of it.
    expected = ft["w"].float() - base["w"].float()
    assert torch.equal(d, expected) and float(d[0, 0]) == 8.0


def test_mixed_precision_pair_matches_float64_reference():
    base = _model(0, torch.float16)
    ft = {k: (v.double() + 1e-3).to(v.dtype) if v.is_floating_point() else v for k, v in _model(0).items()}
    tv = wl.TaskVectors(base, [ft])
    ref = ft["layer.weight"].double() - base["layer.weight"].double()
    torch.testing.assert_close(tv.delta("task0", "layer.weight").double(), ref, rtol=0, atol=1e-6)


def test_names_come_from_files_and_duplicates_get_suffixes(tmp_path):
    base = _model(0)
    paths = []
    for i, sub in enumerate(["x", "y"]):
        (tmp_path / sub).mkdir()
        p = tmp_path / sub / "mnist.safetensors"
        save_file(_model(i + 1), str(p))
        paths.append(p)
    tv = wl.TaskVectors(base, paths)
    assert tv.names == ["mnist", "mnist_2"]
    tv2 = wl.TaskVectors(base, [_model(1), _model(2)])
    assert tv2.names == ["task0", "task1"]


def test_include_exclude_patterns():
    base, a = _model(0), _model(1)
    tv = wl.TaskVectors(base, [a], include="layer.*")
    assert tv.keys == ["layer.weight", "layer.bias"]
    tv = wl.TaskVectors(base, [a], exclude=["*.bias", "embed.*"])
    assert tv.keys == ["layer.weight", "conv.weight"]
    with pytest.raises(wl.DTypeError, match="norm.num_batches_tracked"):
        wl.TaskVectors(base, [a], include=["norm.num_batches_tracked"])
    with pytest.raises(wl.KeyMismatchError, match="No floating-point keys"):
        wl.TaskVectors(base, [a], include="nothing.*")


def test_subset_keeps_order_and_shares_cache():
    tv = wl.TaskVectors(_model(0), {"a": _model(1), "b": _model(2), "c": _model(3)})
    sub = tv.subset(["c", "a"])
    assert sub.names == ["c", "a"] and sub.cache is tv.cache and tv.names == ["a", "b", "c"]
    torch.testing.assert_close(sub.deltas("layer.bias")[0], tv.delta("c", "layer.bias"))
    with pytest.raises(wl.KeyMismatchError, match="Unknown task"):
        tv.subset(["zzz"])


def test_missing_and_extra_keys_name_both_checkpoints_and_the_keys():
    base = _model(0)
    ft = _model(1)
    del ft["layer.bias"]
    with pytest.raises(wl.KeyMismatchError) as err:
        wl.TaskVectors(base, {"sst2": ft})
    msg = str(err.value)
    assert "'sst2'" in msg and "'layer.bias'" in msg and "lacks 1 key" in msg
    ft = _model(1)
    ft["head.weight"] = torch.zeros(2, 2)
    with pytest.raises(KeyError, match="head.weight"):  # also a builtin KeyError
        wl.TaskVectors(base, {"sst2": ft})


def test_shape_mismatch_names_key_and_both_shapes():
    ft = _model(1)
    ft["layer.weight"] = torch.zeros(6, 5)
    with pytest.raises(wl.ShapeMismatchError) as err:
        wl.TaskVectors(_model(0), {"cola": ft})
    msg = str(err.value)
    assert "'layer.weight'" in msg and "(6, 4)" in msg and "(6, 5)" in msg and "'cola'" in msg


def test_float_versus_integer_dtype_is_refused():
    ft = _model(1)
    ft["layer.bias"] = torch.zeros(6, dtype=torch.int32)
    with pytest.raises(wl.DTypeError, match="layer.bias"):
        wl.TaskVectors(_model(0), {"a": ft})


def test_non_finite_values_are_counted_and_named(tmp_path):
    ft = _model(1)
    ft["layer.weight"][0, :3] = float("nan")
    ft["layer.weight"][1, 0] = float("inf")
    path = tmp_path / "broken.safetensors"
    save_file(ft, str(path))
    tv = wl.TaskVectors(_model(0), [path])
    tv.delta("broken", "layer.bias")  # other keys still work
    with pytest.raises(wl.NonFiniteError) as err:
        tv.deltas("layer.weight")
    msg = str(err.value)
    assert "broken" in msg and "'layer.weight'" in msg and "4 of 24" in msg


def test_unknown_key_and_task_are_clear():
    tv = wl.TaskVectors(_model(0), {"a": _model(1)})
    with pytest.raises(wl.KeyMismatchError, match="'nope'"):
        tv.delta("a", "nope")
    with pytest.raises(wl.KeyMismatchError, match=r"tasks are \['a'\]"):
        tv.delta("b", "layer.weight")
    with pytest.raises(wl.DTypeError, match="floating-point"):
        tv.delta("a", "norm.num_batches_tracked")


def test_module_sources_and_repr():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ft = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    tv = wl.TaskVectors(base, {"ft": ft})
    assert "1.num_batches_tracked" not in tv.keys
    assert tv.kind("0.weight") == "matrix" and tv.kind("1.running_mean") == "vector"
    torch.testing.assert_close(tv.delta("ft", "0.weight"), ft[0].weight.detach() - base[0].weight.detach())
    assert "tasks=['ft']" in repr(tv) and "1 matrix" in repr(tv)
