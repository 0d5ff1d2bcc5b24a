"""The GGUF reader: the same metadata and tensors as gguf-py's GGUFReader for every value and tensor kind the
loader meets, and ValueError (never a crash deep in a loader) for a file cut short anywhere."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from gpu_worker.loading.gguf_reader import GGUFFile


def _write(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.125)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.text", "héllo ▁world")
    writer.add_array("t.words", ["a", "", "Ġthe", "<|im_end|>"])
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("a.weight", weight)
    writer.add_tensor("b.weight", weight.astype(np.float16))
    q8 = quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4 = quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("d.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_it_reads_what_gguf_py_reads(tmp_path: Path) -> None:
    path = _write(tmp_path / "kinds.gguf")
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
    assert ours.fields == expected
    assert (
        ours.fields["t.words"] == ["a", "", "Ġthe", "<|im_end|>"] and ours.fields["t.text"] == "héllo ▁world"
    )
    assert [t.name for t in ours.tensors] == ["a.weight", "b.weight", "c.weight", "d.weight"]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == reference.tensor_type and mine.n_bytes == int(reference.n_bytes)
        assert mine.shape == tuple(int(n) for n in reference.shape) == (64, 4)
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape
        assert np.array_equal(mine.data, reference.data), mine.name


def test_it_refuses_a_file_cut_short_anywhere(tmp_path: Path) -> None:
    whole = _write(tmp_path / "kinds.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (0, 3, 10, 30, len(whole) // 4, len(whole) // 2, len(whole) - 1):
        cut.write_bytes(whole[:size])
        with pytest.raises(ValueError):
            GGUFFile(cut)


def test_it_refuses_what_is_not_gguf_or_a_version_it_does_not_read(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + b"\x00" * 64)
    with pytest.raises(ValueError, match="magic"):
        GGUFFile(path)
    path.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + b"\x00" * 64)
    with pytest.raises(ValueError, match="version 9"):
        GGUFFile(path)


def test_it_refuses_a_crafted_alignment_or_nesting_with_value_error(tmp_path: Path) -> None:
    def string(text: str) -> bytes:
        return len(text).to_bytes(8, "little") + text.encode()

    def header(field: bytes) -> bytes:  # GGUF v3, no tensors, one metadata field
        return (
            b"GGUF"
            + (3).to_bytes(4, "little")
            + (0).to_bytes(8, "little")
            + (1).to_bytes(8, "little")
            + field
        )

    array_of_one = (9).to_bytes(4, "little") + (1).to_bytes(8, "little")  # item type array, count 1
    crafted = {
        "alignment 0": string("general.alignment") + (4).to_bytes(4, "little") + (0).to_bytes(4, "little"),
        "alignment list": string("general.alignment")
        + b"".join(n.to_bytes(size, "little") for n, size in ((9, 4), (4, 4), (1, 8), (32, 4))),  # [32]
        "arrays 5000 deep": string("k") + (9).to_bytes(4, "little") + array_of_one * 5000,
    }
    path = tmp_path / "crafted.gguf"
    for field in crafted.values():
        path.write_bytes(header(field) + bytes(64))
        with pytest.raises(ValueError):  # before: ZeroDivisionError, TypeError, RecursionError
            GGUFFile(path)
