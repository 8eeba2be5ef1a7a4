"""Bad-input corpus for ``wl.load``: every hostile or broken input gets one clear error and no side effect.

Each case is built by a function below into a fresh folder (no binaries are committed). Each test
asserts the error class, that the message names the file (and the tensor key where there is one),
that nothing under the folder was written or deleted, and that nothing ran (the pickle marker file
never appears).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _safety import assert_unchanged, pickle_payload, snapshot
from safetensors.torch import save_file

import weightlens as wl

F32_1 = b"\x00\x00\x80\x3f"
Builder = Callable[[Path], Path]


# --------------------------------------------------------------------------------------- builders
def _st_file(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str = "F32", shape: str = "[1]", offsets: str = "[0,4]") -> str:
    return f'{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}'


def corrupt_header(d: Path) -> Path:
    """JSON that does not parse."""
    return _st_file(d / "corrupt.safetensors", '{"w": {"dtype": "F32", ')


def non_object_header(d: Path) -> Path:
    """A JSON list where the header object belongs."""
    return _st_file(d / "list.safetensors", "[]")


def duplicate_key(d: Path) -> Path:
    """Key ``w`` twice, first as F32 then as I32 (readers keeping the first or last would disagree)."""
    return _st_file(d / "dup.safetensors", '{"w":%s,"w":%s}' % (_entry(), _entry("I32")), F32_1)


def gap(d: Path) -> Path:
    """Tensor ``w`` starts 4 bytes into the data section, leaving unexplained bytes before it."""
    return _st_file(d / "gap.safetensors", '{"w":%s}' % _entry(offsets="[4,8]"), bytes(4) + F32_1)


def overlap(d: Path) -> Path:
    """Tensors ``a`` and ``w`` share their bytes."""
    return _st_file(d / "overlap.safetensors", '{"a":%s,"w":%s}' % (_entry(), _entry()), F32_1)


def trailing(d: Path) -> Path:
    """Bytes after the last tensor ``w`` (an appended payload)."""
    return _st_file(d / "trailing.safetensors", '{"w":%s}' % _entry(), F32_1 + b"#!/bin/sh\n")


def metadata_not_object(d: Path) -> Path:
    """``__metadata__`` is a list."""
    return _st_file(d / "meta_list.safetensors", '{"__metadata__":["x"],"w":%s}' % _entry(), F32_1)


def metadata_not_string(d: Path) -> Path:
    """A ``__metadata__`` value is a number."""
    return _st_file(d / "meta_int.safetensors", '{"__metadata__":{"step":3},"w":%s}' % _entry(), F32_1)


def negative_dim(d: Path) -> Path:
    """Tensor ``w`` has shape ``[2, -3]``."""
    return _st_file(d / "negative.safetensors", '{"w":%s}' % _entry(shape="[2,-3]", offsets="[0,0]"))


def float_dim(d: Path) -> Path:
    """Tensor ``w`` has shape ``[1.0]``."""
    return _st_file(d / "float_dim.safetensors", '{"w":%s}' % _entry(shape="[1.0]"), F32_1)


def huge_dim(d: Path) -> Path:
    """Tensor ``w`` has a dimension beyond torch's int64 sizes."""
    return _st_file(d / "huge_dim.safetensors", '{"w":%s}' % _entry(shape=f"[0,{2**63}]", offsets="[0,0]"))


def _index(d: Path, stem: str, weight_map: dict[str, str]) -> Path:
    path = d / f"{stem}.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def empty_index(d: Path) -> Path:
    """A safetensors index whose weight_map is empty, next to a real shard."""
    save_file({"w": torch.zeros(2)}, str(d / "model-00001-of-00001.safetensors"))
    return _index(d, "model.safetensors", {})


def empty_bin_index(d: Path) -> Path:
    """The same for a ``pytorch_model.bin`` index."""
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model-00001-of-00001.bin")
    return _index(d, "pytorch_model.bin", {})


def key_in_two_shards(d: Path) -> Path:
    """The index maps ``w`` to shard 1, but shard 2 (also listed) holds a different ``w``."""
    save_file({"w": torch.zeros(2), "a": torch.zeros(1)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"w": torch.ones(2), "b": torch.zeros(1)}, str(d / "model-00002-of-00002.safetensors"))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    return _index(d, "model.safetensors", {"w": names[0], "a": names[0], "b": names[1]})


def key_in_two_bin_shards(d: Path) -> Path:
    """The same for ``pytorch_model.bin`` shards."""
    torch.save({"w": torch.zeros(2), "a": torch.zeros(1)}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"w": torch.ones(2), "b": torch.zeros(1)}, d / "pytorch_model-00002-of-00002.bin")
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    return _index(d, "pytorch_model.bin", {"w": names[0], "a": names[0], "b": names[1]})


def shard_outside_folder(d: Path) -> Path:
    """An index whose shard path climbs out of the index's folder."""
    (d / "inner").mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "outside.safetensors"))
    return _index(d / "inner", "model.safetensors", {"w": "../outside.safetensors"})


def fifo_file(d: Path) -> Path:
    """A named pipe called ``pipe.safetensors``: opening it for reading would block forever."""
    os.mkfifo(d / "pipe.safetensors")
    return d / "pipe.safetensors"


def fifo_bin(d: Path) -> Path:
    """The same, named ``.bin``."""
    os.mkfifo(d / "pipe.bin")
    return d / "pipe.bin"


def fifo_in_folder(d: Path) -> Path:
    """An HF folder whose ``model.safetensors`` is a named pipe."""
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{}")
    os.mkfifo(d / "hf" / "model.safetensors")
    return d / "hf"


def fifo_shard(d: Path) -> Path:
    """An index whose one shard is a named pipe."""
    os.mkfifo(d / "model-00001-of-00001.safetensors")
    return _index(d, "model.safetensors", {"w": "model-00001-of-00001.safetensors"})


def fifo_index(d: Path) -> Path:
    """The index itself is a named pipe."""
    os.mkfifo(d / "model.safetensors.index.json")
    return d / "model.safetensors.index.json"


def fifo_unknown_suffix(d: Path) -> Path:
    """A named pipe with a suffix weightlens would sniff."""
    os.mkfifo(d / "weights.data")
    return d / "weights.data"


class _Touch:
    """Pickled inside a torch zip archive, loading this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def malicious_raw_pickle(d: Path) -> Path:
    """A plain pickle (what a legacy ``.bin`` is) whose loading would run ``touch marker``."""
    (d / "evil.bin").write_bytes(pickle_payload(d.parent / "marker"))
    return d / "evil.bin"


def malicious_zip_pickle(d: Path) -> Path:
    """A ``torch.save`` archive holding a tensor and the same payload."""
    torch.save({"w": torch.zeros(2), "x": _Touch(d.parent / "marker")}, d / "evil.pt")
    return d / "evil.pt"


def malicious_bin_shard(d: Path) -> Path:
    """A sharded ``.bin`` checkpoint whose one shard carries the payload."""
    (d / "pytorch_model-00001-of-00001.bin").write_bytes(pickle_payload(d.parent / "marker"))
    return _index(d, "pytorch_model.bin", {"w": "pytorch_model-00001-of-00001.bin"})


def malicious_in_folder(d: Path) -> Path:
    """An HF folder whose ``pytorch_model.bin`` carries the payload."""
    (d / "hf").mkdir()
    torch.save({"w": torch.zeros(2), "x": _Touch(d.parent / "marker")}, d / "hf" / "pytorch_model.bin")
    return d / "hf"


def pickled_tensor(name: str, tensor: torch.Tensor) -> Builder:
    """A builder of a ``.pt`` file holding ``{"w": tensor}``."""
    def build(d: Path) -> Path:
        torch.save({"ok": torch.zeros(1), "w": tensor}, d / f"{name}.pt")
        return d / f"{name}.pt"
    return build


def bin_shard_with(name: str, tensor: torch.Tensor) -> Builder:
    """A builder of a sharded ``.bin`` checkpoint whose tensor ``w`` is ``tensor``."""
    def build(d: Path) -> Path:
        torch.save({"w": tensor}, d / f"{name}-00001-of-00001.bin")
        return _index(d, f"{name}.bin", {"w": f"{name}-00001-of-00001.bin"})
    return build


def _cases() -> dict[str, tuple[Builder, type[Exception], tuple[str, ...]]]:
    """name -> (builder, error class, words the message holds: the file at fault, the key, the fault)."""
    C, U = wl.CheckpointError, wl.UnsafeCheckpointError
    shard2 = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    bin2 = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    bin1 = "pytorch_model-00001-of-00001.bin"
    return {
        "corrupt-header": (corrupt_header, C, ("corrupt.safetensors", "not valid JSON")),
        "non-object-header": (non_object_header, C, ("list.safetensors", "not a JSON object")),
        "duplicate-key": (duplicate_key, C, ("dup.safetensors", "'w'", "more than once")),
        "gap": (gap, C, ("gap.safetensors", "'w'", "gap of 4 bytes")),
        "overlap": (overlap, C, ("overlap.safetensors", "'w'", "overlaps")),
        "trailing": (trailing, C, ("trailing.safetensors", "'w'", "follow the last tensor")),
        "metadata-not-object": (metadata_not_object, C, ("meta_list.safetensors", "__metadata__", "not an object")),
        "metadata-not-string": (metadata_not_string, C, ("meta_int.safetensors", "__metadata__", "'step'",
                                                         "not a string")),
        "negative-dim": (negative_dim, C, ("negative.safetensors", "'w'", "[2, -3]", "-3, which is negative")),
        "float-dim": (float_dim, C, ("float_dim.safetensors", "'w'", "[1.0]", "not an integer")),
        "huge-dim": (huge_dim, C, ("huge_dim.safetensors", "'w'", "beyond torch's limit")),
        "empty-index": (empty_index, C, ("model.safetensors.index.json", "weight_map is empty")),
        "empty-bin-index": (empty_bin_index, C, ("pytorch_model.bin.index.json", "weight_map is empty")),
        "key-in-two-shards": (key_in_two_shards, C, ("'w'", *shard2)),
        "key-in-two-bin-shards": (key_in_two_bin_shards, C, ("'w'", *bin2)),
        "shard-outside-folder": (shard_outside_folder, C, ("model.safetensors.index.json", "'w'",
                                                           "../outside.safetensors", "relative")),
        "malicious-raw-pickle": (malicious_raw_pickle, U, ("evil.bin", "weights_only=True")),
        "malicious-zip-pickle": (malicious_zip_pickle, U, ("evil.pt", "weights_only=True")),
        "malicious-bin-shard": (malicious_bin_shard, U, (bin1, "weights_only=True")),
        "malicious-in-folder": (malicious_in_folder, U, ("pytorch_model.bin", "weights_only=True")),
        "pickled-sparse": (pickled_tensor("sparse", torch.eye(3).to_sparse()), C,
                           ("sparse.pt", "'w'", "to_dense()")),
        "pickled-sparse-csr": (pickled_tensor("csr", torch.eye(2).to_sparse_csr()), C,
                               ("csr.pt", "'w'", "to_dense()")),
        "pickled-complex": (pickled_tensor("complex", torch.ones(2, dtype=torch.complex64)), C,
                            ("complex.pt", "'w'", "complex", "imaginary")),
        "pickled-meta": (pickled_tensor("meta", torch.empty(2, device="meta")), C, ("meta.pt", "'w'", "meta device")),
        "bin-shard-complex": (bin_shard_with("pytorch_model", torch.ones(2, dtype=torch.complex128)), C,
                              (bin1, "'w'", "complex")),
    }


CASES = _cases()
FIFOS: dict[str, Builder] = {
    "fifo-safetensors": fifo_file, "fifo-bin": fifo_bin, "fifo-in-folder": fifo_in_folder,
    "fifo-shard": fifo_shard, "fifo-index": fifo_index, "fifo-unknown-suffix": fifo_unknown_suffix,
}


@pytest.fixture
def corpus(tmp_path: Path) -> Callable[[str], tuple[Path, Path]]:
    """Builds one case into its own folder under tmp_path: ``(what to load, the folder)``."""
    def build(name: str) -> tuple[Path, Path]:
        folder = tmp_path / "corpus" / name
        folder.mkdir(parents=True)
        builder = CASES[name][0] if name in CASES else FIFOS[name]
        return builder(folder), folder
    return build


def _assert_refused(source: object, folder: Path, error: type[Exception], words: tuple[str, ...]) -> None:
    before = snapshot(folder.parent)
    with pytest.raises(error) as info:
        wl.load(source)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for word in (str(folder), *words):
        assert word in message, f"{word!r} not in the message: {message}"
    assert_unchanged(before, folder.parent)
    assert not (folder.parent / "marker").exists() and not (folder.parent.parent / "marker").exists()


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(CASES))
def test_bad_file_is_refused_with_one_clear_error(corpus, name):
    source, folder = corpus(name)
    _, error, words = CASES[name]
    _assert_refused(source, folder, error, words)


def _load_with_timeout(source: Path, fifos: list[Path], seconds: float = 20.0) -> BaseException | None:
    """``wl.load(source)`` in a thread; on a hang, unblock it by opening the pipes' write ends, then fail."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            wl.load(source)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5)
        pytest.fail(f"wl.load({source}) blocked on a named pipe for {seconds} s")
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
@pytest.mark.parametrize("name", list(FIFOS))
def test_named_pipes_are_refused_without_blocking(corpus, name):
    source, folder = corpus(name)
    fifos = [p for p in folder.rglob("*") if p.is_fifo()]
    before = snapshot(folder)
    exc = _load_with_timeout(source, fifos)
    assert isinstance(exc, wl.CheckpointError), exc
    message = str(exc)
    assert "FIFO" in message and str(fifos[0]) in message, message
    assert_unchanged(before, folder)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_file_is_refused(tmp_path):
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    before = snapshot(tmp_path)
    with pytest.raises(wl.CheckpointError, match=r"zero\.safetensors: is a character device"):
        wl.load(link)
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("empty", ["", Path(""), Path()])
def test_empty_path_is_an_error_not_the_current_folder(tmp_path, monkeypatch, empty):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(wl.CheckpointError, match="path is empty"):
        wl.load(empty)
    assert_unchanged(before, tmp_path)
    assert len(wl.load("./")) == 1  # an explicit folder still works


def test_in_memory_meta_sparse_and_complex_tensors_are_refused():
    ok = torch.zeros(2)
    cases = {
        "meta device": {"ok": ok, "w": torch.empty(2, 2, device="meta")},
        "to_dense()": {"ok": ok, "w": torch.eye(2).to_sparse()},
        "imaginary": {"ok": ok, "w": torch.ones(2, dtype=torch.complex64)},
    }
    for words, sd in cases.items():
        with pytest.raises(wl.CheckpointError, match=rf"<state dict>: key 'w' .*{words}"):
            wl.load(sd)
    with pytest.raises(wl.CheckpointError, match=r"<Linear>: key 'weight' is on the meta device"):
        wl.load(torch.nn.Linear(2, 2, device="meta"))
