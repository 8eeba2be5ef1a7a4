"""wl.load: every source kind, laziness, and clear errors for bad files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightlens as wl
from weightlens.io import _safetensors as st


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(11, 4, generator=g),
        "layer.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "layer.bias": torch.randn(6, generator=g).to(torch.float16),
        "norm.count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(ckpt: wl.Checkpoint, ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt) == sorted(ref)
    for key, value in ref.items():
        assert ckpt.shape(key) == tuple(value.shape) and ckpt.dtype(key) == value.dtype
        got = ckpt[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key


def _shard(tmp: Path, sd: dict[str, torch.Tensor], split: list[list[str]], fmt: str = "safetensors") -> Path:
    weight_map = {}
    for i, keys in enumerate(split):
        fname = f"model-{i + 1:05d}-of-{len(split):05d}.{fmt}"
        part = {k: sd[k] for k in keys}
        if fmt == "safetensors":
            save_file(part, str(tmp / fname))
        else:
            torch.save(part, tmp / fname)
        weight_map.update({k: fname for k in keys})
    stem = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    index = tmp / f"{stem}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_single_safetensors_round_trip_keeps_dtypes(tmp_path):
    sd = _weights()
    save_file(sd, str(tmp_path / "ft_math.safetensors"), metadata={"origin": "test"})
    ckpt = wl.load(tmp_path / "ft_math.safetensors")
    assert ckpt.name == "ft_math" and ckpt.hf_dir is None and ckpt.metadata == {"origin": "test"}
    _assert_same(ckpt, sd)
    assert list(ckpt) == ["embed.weight", "layer.bias", "layer.weight", "mask", "norm.count"]  # natural order
    assert ckpt.info("embed.weight").file == str(tmp_path / "ft_math.safetensors")
    assert ckpt.nbytes == sum(v.numel() * v.element_size() for v in sd.values())


def test_opening_reads_no_tensor_data(tmp_path, monkeypatch):
    save_file(_weights(), str(tmp_path / "m.safetensors"))
    index = _shard(tmp_path, _weights(), [["embed.weight", "mask"], ["layer.weight", "layer.bias", "norm.count"]])
    reads: list[str] = []
    real = st.read_tensor
    monkeypatch.setattr(st, "read_tensor", lambda p, k, e: reads.append(k) or real(p, k, e))
    for src in (tmp_path / "m.safetensors", index):
        ckpt = wl.load(src)
        assert ckpt.shape("layer.weight") == (6, 4) and len(ckpt) == 5 and "mask" in ckpt
    assert reads == []
    ckpt["layer.bias"]
    assert reads == ["layer.bias"]


def test_sharded_safetensors_and_hf_folder(tmp_path):
    sd = _weights(1)
    index = _shard(tmp_path, sd, [["embed.weight", "layer.weight"], ["layer.bias", "norm.count", "mask"]])
    _assert_same(wl.load(index), sd)
    (tmp_path / "config.json").write_text("{}")
    folder = wl.load(tmp_path)
    _assert_same(folder, sd)
    assert folder.name == tmp_path.name and folder.hf_dir == tmp_path
    assert folder.info("mask").file.endswith("model-00002-of-00002.safetensors")


def test_hf_folder_with_pytorch_bin_and_sharded_bin(tmp_path):
    sd = _weights(2)
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text("{}")
    torch.save(sd, one / "pytorch_model.bin")
    ckpt = wl.load(one)
    _assert_same(ckpt, sd)
    assert ckpt.name == "one" and ckpt.hf_dir == one
    many = tmp_path / "many"
    many.mkdir()
    _shard(many, sd, [["embed.weight"], ["layer.weight", "layer.bias", "norm.count", "mask"]], fmt="bin")
    _assert_same(wl.load(many), sd)


def test_pt_file_nested_state_dict_module_and_mapping(tmp_path):
    sd = _weights(3)
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "run.ckpt")
    _assert_same(wl.load(tmp_path / "run.ckpt"), sd)
    _assert_same(wl.load(sd), sd)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ckpt = wl.load(module)
    _assert_same(ckpt, module.state_dict())
    assert list(ckpt) == list(module.state_dict())  # module order kept
    assert ckpt.name == "Sequential" and ckpt.dtype("1.num_batches_tracked") == torch.int64
    again = wl.load(ckpt, name="renamed")
    assert again.name == "renamed" and ckpt.name == "Sequential" and wl.load(ckpt) is ckpt


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _Evil()}, path)
    with pytest.raises(wl.UnsafeCheckpointError, match=r"evil\.pt.*weights_only=True"):
        wl.load(path)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(wl.CheckpointError, match=r"raw\.bin"):
        wl.load(raw)


def test_truncated_safetensors_names_file_and_key(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(wl.CheckpointError, match=r"cut\.safetensors: key 'b'.*truncated"):
        wl.load(path)
    path.write_bytes(data[:5])
    with pytest.raises(wl.CheckpointError, match=r"cut\.safetensors.*truncated"):
        wl.load(path)


def test_corrupt_header_and_bad_offsets(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b"{not json"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(wl.CheckpointError, match=r"bad\.safetensors.*not valid JSON"):
        wl.load(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(wl.CheckpointError, match=r"key 'w'.*needs 16 bytes"):
        wl.load(path)
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(wl.DTypeError, match=r"key 'w'.*'C64'"):
        wl.load(path)


def test_truncated_and_corrupt_pickles(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(wl.CheckpointError, match=r"cut\.pt.*corrupt or truncated"):
        wl.load(path)


def test_shard_index_problems_are_named(tmp_path):
    sd = _weights()
    index = _shard(tmp_path, sd, [["embed.weight", "layer.weight"], ["layer.bias", "norm.count", "mask"]])
    raw = json.loads(index.read_text())
    raw["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(wl.CheckpointError, match=r"'ghost.weight'.*model-00001-of-00002"):
        wl.load(index)
    raw["weight_map"]["ghost.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(wl.CheckpointError, match=r"missing.*model-00009-of-00009"):
        wl.load(index)
    index.write_text("[]")
    with pytest.raises(wl.CheckpointError, match="weight_map"):
        wl.load(index)


def test_unknown_key_suggests_close_matches():
    ckpt = wl.load({"encoder.layer.0.weight": torch.zeros(2, 2)})
    with pytest.raises(wl.KeyMismatchError, match=r"'encoder.layer.0.wieght'.*Did you mean 'encoder.layer.0.weight'"):
        ckpt["encoder.layer.0.wieght"]
    with pytest.raises(KeyError):  # still a KeyError for Mapping users
        ckpt.info("nope")
    assert ckpt.get("nope") is None


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(wl.CheckpointError, match="no such file"):
        wl.load(tmp_path / "missing.safetensors")
    with pytest.raises(wl.CheckpointError, match="no weights found"):
        wl.load(tmp_path)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(wl.CheckpointError, match="2 \\*.safetensors files and no index"):
        wl.load(tmp_path)
    with pytest.raises(wl.CheckpointError, match="Cannot load a checkpoint from int"):
        wl.load(42)
    with pytest.raises(wl.CheckpointError, match=r"'step' \(int\)"):
        wl.load({"w": torch.zeros(1), "step": 3})
    odd = tmp_path / "weights.data"
    odd.write_bytes(b"hello world")
    with pytest.raises(wl.CheckpointError, match="unknown checkpoint format"):
        wl.load(odd)


def test_unknown_suffix_is_sniffed(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, str(tmp_path / "weights.st"))
    torch.save(sd, tmp_path / "weights.torch")
    _assert_same(wl.load(tmp_path / "weights.st"), sd)
    _assert_same(wl.load(tmp_path / "weights.torch"), sd)


def test_zoo_minilm_folder_is_an_hf_checkpoint(minilm_zoo):
    base = wl.load(minilm_zoo.base)
    assert base.hf_dir is not None and (base.hf_dir / "config.json").is_file()
    assert len(base) == 104 and base.shape("embeddings.word_embeddings.weight")[1] == 384
