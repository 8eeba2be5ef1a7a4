"""TaskVectors: key validation, parameter classes, fp32 deltas, clear errors."""

from __future__ import annotations

import json

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
    assert "exclude=['layer.bias']" in msg and "key_map=" in msg  # advice that works:
    tv = wl.TaskVectors(base, {"sst2": ft}, exclude=["layer.bias"])
    assert "layer.bias" not in tv.keys
    ft = _model(1)
    ft["head.weight"] = torch.zeros(2, 2)
    tv = wl.TaskVectors(base, {"sst2": ft})  # a key only the fine-tune has is its extra, not an error
    assert tv.extras == {"sst2": ["head.weight"]} and "head.weight" not in tv.keys


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


# ---------------------------------------------------------------------------- include/exclude first
def test_exclude_reaches_validation_heads_and_resized_keys():
    base = _model(0)
    ft = _model(1)
    ft["classifier.weight"] = torch.ones(3, 4)
    tv = wl.TaskVectors(base, {"a": ft}, exclude=["classifier.*"])  # the advice of the old error works
    assert tv.extras == {"a": []} and tv.keys == ["embed.weight", "layer.weight", "layer.bias", "conv.weight"]
    ft["embed.weight"] = torch.zeros(12, 4)  # a resized embedding, left out
    tv = wl.TaskVectors(base, {"a": ft}, exclude=["embed.*"])
    assert "embed.weight" not in tv.keys
    torch.testing.assert_close(tv.delta("a", "layer.weight"), ft["layer.weight"] - base["layer.weight"])
    tv = wl.TaskVectors(base, {"a": ft}, include="layer.*")  # include filters before validation too
    assert tv.keys == ["layer.weight", "layer.bias"] and tv.extras == {"a": []}
    ft["layer.bias"] = torch.zeros(7)  # a key kept by the filter is still checked
    with pytest.raises(wl.ShapeMismatchError, match="'layer.bias'"):
        wl.TaskVectors(base, {"a": ft}, include="layer.*")


def test_a_missing_integer_buffer_does_not_block_the_float_keys():
    base, ft = _model(0), _model(1)
    del ft["norm.num_batches_tracked"]  # not a task-vector key: copied from the base by merges
    tv = wl.TaskVectors(base, {"a": ft})
    assert "norm.num_batches_tracked" not in tv.keys


# ---------------------------------------------------------------------------- key alignment
def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def test_a_prefix_on_the_fine_tune_keys_is_found_and_reported_once():
    base = _model(0)
    a = _prefixed(_model(1), "bert.") | {"classifier.weight": torch.ones(2, 4), "classifier.bias": torch.ones(2)}
    b = _prefixed(_model(2), "bert.") | {"classifier.weight": torch.ones(3, 4), "classifier.bias": torch.ones(3)}
    with pytest.warns(wl.taskvectors.KeyMapWarning) as record:
        tv = wl.TaskVectors(base, {"a": a, "b": b})
    assert len(record) == 1
    msg = str(record[0].message)
    assert "'bert.' + base key" in msg and "'a'" in msg and "'b'" in msg and "classifier.weight" in msg
    assert tv.keys == ["embed.weight", "layer.weight", "layer.bias", "conv.weight"]
    for key in tv.keys:  # independent reference: the fine-tune's own key minus the base key
        torch.testing.assert_close(tv.delta("a", key), a["bert." + key] - base[key], rtol=0, atol=0)
        torch.testing.assert_close(tv.deltas(key)[1], b["bert." + key] - base[key], rtol=0, atol=0)
    assert tv.extras == {"a": ["classifier.weight", "classifier.bias"], "b": ["classifier.weight", "classifier.bias"]}
    assert tv.key_maps["a"]["bert.layer.weight"] == "layer.weight" and "classifier.weight" not in tv.key_maps["a"]
    assert tv.key_maps["a"]["bert.norm.num_batches_tracked"] == "norm.num_batches_tracked"
    assert torch.equal(tv.extra("b", "classifier.weight"), torch.ones(3, 4))
    with pytest.raises(wl.KeyMismatchError, match="not an extra of task 'a'"):
        tv.extra("a", "layer.weight")
    assert tv.subset(["b"]).extras == {"b": ["classifier.weight", "classifier.bias"]}


def test_a_prefix_on_the_base_keys_is_found_too():
    base = _prefixed(_model(0), "model.") | {"lm_head.weight": torch.zeros(5, 4)}
    ft = _model(1)
    with pytest.warns(wl.taskvectors.KeyMapWarning, match="without 'model.'"):
        tv = wl.TaskVectors(base, {"a": ft}, exclude="lm_head.*")
    torch.testing.assert_close(tv.delta("a", "model.layer.weight"), ft["layer.weight"] - base["model.layer.weight"])
    assert tv.key_maps == {"a": {k: "model." + k for k in ft}}


def test_explicit_key_maps_dict_function_per_task():
    base = _model(0)
    ft = _model(1)
    ft["dense.weight"] = ft.pop("layer.weight")
    tv = wl.TaskVectors(base, {"a": ft}, key_map={"dense.weight": "layer.weight"})
    torch.testing.assert_close(tv.delta("a", "layer.weight"), ft["dense.weight"] - base["layer.weight"])
    assert tv.key_maps == {"a": {"dense.weight": "layer.weight"}} and tv.extras == {"a": []}
    tv = wl.TaskVectors(base, {"a": ft}, key_map=lambda k: k.replace("dense.", "layer."))
    assert tv.key_maps == {"a": {"dense.weight": "layer.weight"}}
    other = _model(2)
    tv = wl.TaskVectors(base, {"a": ft, "b": other}, key_map={"a": {"dense.weight": "layer.weight"}})
    assert tv.key_maps == {"a": {"dense.weight": "layer.weight"}, "b": {}}
    with pytest.raises(wl.KeyMismatchError, match=r"'dense.weight'.*'layer.weigth', which base has not"):
        wl.TaskVectors(base, {"a": ft}, key_map={"dense.weight": "layer.weigth"})
    with pytest.raises(wl.InvalidParameterError, match="key_map"):
        wl.TaskVectors(base, {"a": ft}, key_map=3)


def test_ambiguous_mappings_raise_one_clear_error():
    base = _model(0)
    ft = _prefixed(_model(1), "bert.") | {"layer.weight": torch.zeros(6, 4)}  # two keys for 'layer.weight'
    with pytest.raises(wl.KeyMismatchError) as err:
        wl.TaskVectors(base, {"a": ft})
    msg = str(err.value)
    assert "'layer.weight'" in msg and "'bert.layer.weight'" in msg and "'a'" in msg and "key_map=" in msg
    with pytest.warns(wl.taskvectors.KeyMapWarning):  # the advice works: leave one out
        tv = wl.TaskVectors(base, {"a": ft}, key_map={"layer.weight": None})
    torch.testing.assert_close(tv.delta("a", "layer.weight"), ft["bert.layer.weight"] - base["layer.weight"])
    partial = _prefixed(_model(1), "bert.")
    partial["head.layer.bias"] = partial.pop("bert.layer.bias")  # the prefix fits only some keys
    with pytest.raises(wl.KeyMismatchError) as err:
        wl.TaskVectors(base, {"a": partial})
    msg = str(err.value)
    assert "lacks 1 key" in msg and "'layer.bias'" in msg and "'bert.'" in msg and "matches 3 of the 4" in msg
    assert "'head.layer.bias'" in msg  # the closest key of the fine-tune


# ---------------------------------------------------------------------------- vocabulary rows
def _vocab_model(seed: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(rows, 4, generator=g), "layer.weight": torch.randn(3, 4, generator=g),
            "head.weight": torch.randn(rows, 4, generator=g), "head.bias": torch.randn(rows, generator=g)}


def test_added_rows_are_refused_by_default_with_both_options():
    with pytest.raises(wl.ShapeMismatchError) as err:
        wl.TaskVectors(_vocab_model(0, 10), {"chat": _vocab_model(1, 12)})
    msg = str(err.value)
    assert "'emb.weight'" in msg and "(10, 4)" in msg and "(12, 4)" in msg and "'chat'" in msg
    assert "vocab='base'" in msg and "vocab='union'" in msg and "2 more rows" in msg
    with pytest.raises(wl.InvalidParameterError, match="'vocab'"):
        wl.TaskVectors(_vocab_model(0, 10), {"chat": _vocab_model(1, 12)}, vocab="merge")


def test_vocab_base_merges_the_base_rows_only():
    base, ft, same = _vocab_model(0, 10), _vocab_model(1, 12), _vocab_model(2, 10)
    tv = wl.TaskVectors(base, {"chat": ft, "plain": same}, vocab="base")
    assert tv.vocab.mode == "base" and tv.vocab.keys == ("emb.weight", "head.weight", "head.bias")
    assert (tv.vocab.shared_rows, tv.vocab.rows, tv.vocab.set_aside) == (10, 10, 2)
    assert dict(tv.vocab.task_rows) == {"chat": 12, "plain": 10} and tv.shared_rows() is tv
    for key in tv.vocab.keys:
        ref = ft[key][:10].double() - base[key].double()
        torch.testing.assert_close(tv.delta("chat", key).double(), ref, rtol=0, atol=1e-6)
        assert tv.shape(key) == tuple(base[key].shape) and tv.deltas(key).shape == (2, *base[key].shape)
    merged = wl.merge(tv, method="task_arithmetic", alpha=1.0)
    assert merged["emb.weight"].shape == (10, 4)
    assert "dropped" in tv.vocab.summary() and "2 of 'chat'" in tv.vocab.summary()


def test_resizes_that_are_not_a_vocabulary_are_refused():
    base, ft = _vocab_model(0, 10), _vocab_model(1, 12)
    ft["head.bias"] = torch.zeros(11)  # rows added unevenly
    with pytest.raises(wl.ShapeMismatchError, match="different row counts"):
        wl.TaskVectors(base, {"a": ft}, vocab="base")
    ft = _vocab_model(1, 8)
    with pytest.raises(wl.ShapeMismatchError, match="fewer vocabulary rows"):
        wl.TaskVectors(base, {"a": ft}, vocab="base")
    ft = _vocab_model(1, 10)
    ft["layer.weight"] = torch.zeros(3, 5)  # a second dimension differs: not rows
    with pytest.raises(wl.ShapeMismatchError) as err:
        wl.TaskVectors(base, {"a": ft}, vocab="base")
    assert "'layer.weight'" in str(err.value) and "vocab=" not in str(err.value)
    with pytest.raises(wl.CheckpointError, match="tokenizer files"):  # union needs the added strings
        wl.TaskVectors(base, {"a": _vocab_model(1, 12)}, vocab="union")


def _save_with_tokens(folder, sd, n_base: int, tokens: dict[str, int]) -> str:
    """A weights file with a minimal tokenizer.json: base words w0.., then ``tokens`` at their ids."""
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    vocab = {f"w{i}": i for i in range(n_base)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t.startswith("<|")} for t, i in tokens.items()]
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab,
                                                                 "unk_token": "w0"}, "added_tokens": added}))
    return str(folder)


def test_vocab_union_rows_are_merged_over_the_tasks_that_have_them(tmp_path):
    base = _vocab_model(0, 10)
    a, b, c = _vocab_model(1, 12), _vocab_model(2, 16), _vocab_model(3, 10)
    # 'a' adds <x> then <y>; 'b' adds <y> then <z> at other ids, and pads to 16 rows
    paths = {"a": _save_with_tokens(tmp_path / "a", a, 10, {"<x>": 10, "<y>": 11}),
             "b": _save_with_tokens(tmp_path / "b", b, 10, {"<y>": 10, "<|z|>": 11}),
             "c": _save_with_tokens(tmp_path / "c", c, 10, {})}
    base_path = _save_with_tokens(tmp_path / "base", base, 10, {})
    tv = wl.TaskVectors(base_path, paths, vocab="union")
    info = tv.vocab
    assert info.mode == "union" and dict(info.added) == {"<x>": 10, "<y>": 11, "<|z|>": 12}
    assert (info.shared_rows, info.rows, info.set_aside) == (10, 13, 3) and dict(info.dropped) == {"a": 0, "b": 4, "c": 0}
    rows = {"a": {10: 10, 11: 11}, "b": {11: 10, 12: 11}, "c": {}}  # union row -> the task's row
    fts = {"a": a, "b": b, "c": c}
    for key in info.keys:
        assert tv.shape(key) == (13, *base[key].shape[1:])
        ref_base = torch.cat([base[key].double(), torch.zeros(3, *base[key].shape[1:], dtype=torch.float64)])
        for u in (10, 11, 12):  # the base value of an added row: the mean of the rows of the tasks that have it
            have = [fts[t][key][r].double() for t in fts for uu, r in rows[t].items() if uu == u]
            ref_base[u] = torch.stack(have).mean(0)
        torch.testing.assert_close(tv.base_tensor(key).double(), ref_base, rtol=0, atol=1e-6)
        for t, ft in fts.items():
            ref = torch.zeros_like(ref_base)
            ref[:10] = ft[key][:10].double() - base[key].double()
            for u, r in rows[t].items():
                ref[u] = ft[key][r].double() - ref_base[u]
            torch.testing.assert_close(tv.delta(t, key).double(), ref, rtol=0, atol=1e-6)
    merged = wl.merge(tv, method="task_arithmetic", alpha=0.3)
    emb = merged["emb.weight"]
    torch.testing.assert_close(emb[10].double(), a["emb.weight"][10].double(), rtol=0, atol=1e-6)  # only 'a' has <x>
    torch.testing.assert_close(emb[11].double(), (a["emb.weight"][11].double() + b["emb.weight"][10].double()) / 2,
                               rtol=0, atol=1e-6)  # <y>: the mean over 'a' and 'b', for any alpha
    shared = tv.shared_rows()
    assert shared.shape("emb.weight") == (10, 4) and shared.cache is not tv.cache and shared.vocab is info
    torch.testing.assert_close(shared.delta("b", "head.bias"), b["head.bias"][:10] - base["head.bias"])
    assert "sets 3 aside" in info.summary()


def test_vocab_union_without_added_tokens_reads_the_base_rows(tmp_path):
    base, ft = _vocab_model(0, 10), _vocab_model(1, 16)  # 6 rows of padding, no token names them
    tv = wl.TaskVectors(_save_with_tokens(tmp_path / "base", base, 10, {}),
                        {"pad": _save_with_tokens(tmp_path / "pad", ft, 10, {})}, vocab="union")
    assert (tv.vocab.rows, dict(tv.vocab.added), dict(tv.vocab.dropped)) == (10, {}, {"pad": 6})
    assert tv.shared_rows() is tv and tv.deltas("emb.weight").shape == (1, 10, 4)
    torch.testing.assert_close(tv.delta("pad", "head.bias"), ft["head.bias"][:10] - base["head.bias"])


def test_write_tokenizer_needs_a_base_tokenizer_of_the_base_rows(tmp_path):
    base = _vocab_model(0, 10)
    ft = _save_with_tokens(tmp_path / "a", _vocab_model(1, 11), 10, {"<|x|>": 10})
    tv = wl.TaskVectors(base, {"a": ft}, vocab="union")  # the base in memory: no tokenizer of its own
    with pytest.raises(wl.CheckpointError, match="base_tokenizer="):
        tv.vocab.write_tokenizer(tmp_path / "out")
    _save_with_tokens(tmp_path / "tok", {"x": torch.zeros(1)}, 10, {})
    written = tv.vocab.write_tokenizer(tmp_path / "out", base_tokenizer=tmp_path / "tok")
    data = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert written == [tmp_path / "out" / "tokenizer.json"]
    assert [(e["id"], e["content"], e["special"]) for e in data["added_tokens"]] == [(10, "<|x|>", True)]
    _save_with_tokens(tmp_path / "tok9", {"x": torch.zeros(1)}, 9, {})
    with pytest.raises(wl.ShapeMismatchError, match="9 tokens"):
        tv.vocab.write_tokenizer(tmp_path / "out2", base_tokenizer=tmp_path / "tok9")
    with pytest.raises(wl.InvalidParameterError, match="union"):
        wl.TaskVectors(base, {"a": ft}, vocab="base").vocab.write_tokenizer(tmp_path / "out3")
