"""Unpacking an uploaded adapter zip: one PEFT folder in, only its two files out, and a clear reason for every
archive that tries to write elsewhere, hides a link, holds too much, or is not an adapter folder at all."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from inference.adapters.archive import UnsafeArchive, extract_adapter
from tests.inference.lora_files import CONFIG, WEIGHTS, adapter_zip, files_under, peft_config, zip_bytes

LIMITS = {"max_bytes": 1 << 20, "max_files": 8}


def _refused(data: bytes, tmp_path: Path, **limits: int) -> str:
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive) as info:
        extract_adapter(io.BytesIO(data), dest, **(LIMITS | limits))
    assert not files_under(tmp_path), "a refused archive must write nothing"
    return info.value.reason


def test_it_extracts_the_adapter_folder_and_only_its_files(tmp_path: Path) -> None:
    data = adapter_zip("pirate/", extra={"pirate/README.md": b"# hi", "pirate/notes/x.txt": b"x"})
    weights = extract_adapter(io.BytesIO(data), tmp_path / "out", **LIMITS)
    assert weights == WEIGHTS
    assert sorted(p.name for p in files_under(tmp_path)) == [CONFIG, WEIGHTS]
    assert json.loads((tmp_path / "out" / CONFIG).read_text()) == peft_config()
    assert set(load_file(tmp_path / "out" / WEIGHTS)) >= {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    }


def test_it_takes_a_folder_at_the_zip_root_and_prefers_safetensors(tmp_path: Path) -> None:
    data = adapter_zip("", extra={"adapter_model.bin": b"pickle would go here"})
    assert extract_adapter(io.BytesIO(data), tmp_path / "out", **LIMITS) == WEIGHTS
    assert not (tmp_path / "out" / "adapter_model.bin").exists()


def test_it_takes_a_bin_when_there_is_no_safetensors(tmp_path: Path) -> None:
    data = zip_bytes({"a/" + CONFIG: b"{}", "a/adapter_model.bin": b"weights"})
    assert extract_adapter(io.BytesIO(data), tmp_path / "out", **LIMITS) == "adapter_model.bin"
    assert (tmp_path / "out" / "adapter_model.bin").read_bytes() == b"weights"


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../../etc/cron.d/evil", "outside"),
        ("pirate/../../evil", "outside"),
        ("..\\..\\evil", "outside"),
        ("/etc/passwd", "absolute"),
        ("C:/Windows/evil", "absolute"),
    ],
)
def test_it_refuses_paths_outside_the_archive(tmp_path: Path, name: str, words: str) -> None:
    data = adapter_zip("pirate/", extra={name: b"owned"})
    assert words in _refused(data, tmp_path)


def test_it_refuses_symlinks(tmp_path: Path) -> None:
    data = zip_bytes({"pirate/" + CONFIG: b"{}", "pirate/" + WEIGHTS: b"x"}, symlinks=["pirate/link"])
    assert "symbolic link" in _refused(data, tmp_path)


def test_it_refuses_too_many_files(tmp_path: Path) -> None:
    extra = {f"pirate/junk{i}.txt": b"" for i in range(10)}
    assert "at most 8" in _refused(adapter_zip("pirate/", extra=extra), tmp_path)


def test_it_refuses_more_bytes_than_the_limit(tmp_path: Path) -> None:
    data = adapter_zip("pirate/", extra={"pirate/big.bin": bytes(2 << 20)})  # compresses to almost nothing
    assert f"at most {1 << 20} are allowed" in _refused(data, tmp_path)


def test_it_refuses_a_zip_of_two_adapters_or_of_none(tmp_path: Path) -> None:
    two = zip_bytes({"a/" + CONFIG: b"{}", "a/" + WEIGHTS: b"", "b/" + CONFIG: b"{}", "b/" + WEIGHTS: b""})
    assert "2 adapter folders" in _refused(two, tmp_path)
    none = zip_bytes({"model.safetensors": b""})
    assert "no adapter_config.json" in _refused(none, tmp_path)
    no_weights = zip_bytes({"a/" + CONFIG: b"{}", "b/" + WEIGHTS: b""})  # weights must sit beside the config
    assert "no adapter_model.safetensors or adapter_model.bin beside a/adapter_config.json" in _refused(
        no_weights, tmp_path
    )


def test_it_refuses_what_is_not_a_zip(tmp_path: Path) -> None:
    assert "not a readable zip" in _refused(b"PK\x03\x04 truncated nonsense", tmp_path)
    assert "not a readable zip" in _refused(json.dumps(peft_config()).encode(), tmp_path)


def test_it_refuses_a_damaged_member(tmp_path: Path) -> None:
    data = bytearray(adapter_zip("pirate/"))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        member = zf.getinfo("pirate/" + WEIGHTS)
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    data[start + 10 : start + 40] = bytes(30)  # inside the deflated weights
    reason = _refused(bytes(data), tmp_path)
    assert "damaged" in reason or "not a readable zip" in reason


def test_it_refuses_a_directory_too_big_for_the_entry_limit_before_parsing_it(tmp_path: Path) -> None:
    # 20,000 directory entries (~1 MiB; 256 MiB would make ~2 GiB of objects) under an end record claiming 1:
    # zipfile walks the directory by its size, building every entry, before the entry limit could refuse it.
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * 20_000
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(local), 0)
    assert "the zip's directory is 940000 bytes" in _refused(local + directory + end, tmp_path)
