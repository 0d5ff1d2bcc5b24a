"""Safe extraction of an uploaded adapter zip: exactly one PEFT folder, nothing that points outside it, bounded
in files and bytes. Only the adapter's own two files are written, under names of our choosing, so no path
from the archive ever reaches the filesystem. No Django here: the limits come in as arguments."""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from contextlib import nullcontext
from pathlib import Path, PurePosixPath
from typing import IO

from gpu_worker.zips import directory_size

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # in order of preference
CHUNK = 1 << 20
# The most one entry of the zip's central directory may take: its fixed 46 bytes, then name, extra and comment.
MAX_ENTRY_BYTES = 46 + 4096


class UnsafeArchive(ValueError):
    """The upload is not a zip of one PEFT folder within the limits; `reason` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def extract_adapter(archive: Path | IO[bytes], dest: Path, *, max_bytes: int, max_files: int) -> str:
    """Write the adapter_config.json and the weights (safetensors preferred) of the one PEFT folder in
    `archive` into the new directory `dest`; return the weights file's name. Raise UnsafeArchive, with
    `dest` removed."""
    try:
        _check_directory(archive, max_files=max_files)
        with zipfile.ZipFile(archive) as zf:
            members = checked_members(zf, max_bytes=max_bytes, max_files=max_files)
            config, weights = adapter_files(members)
            dest.mkdir(parents=True)
            try:
                budget = [max_bytes]
                for member, name in (
                    (config, ADAPTER_CONFIG),
                    (weights, PurePosixPath(weights.filename).name),
                ):
                    _copy_bounded(zf, member, dest / name, budget)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)  # a refused archive leaves nothing behind
                raise
    except zipfile.BadZipFile as exc:
        raise UnsafeArchive(f"the upload is not a readable zip file ({exc})") from exc
    except (zlib.error, EOFError, NotImplementedError) as exc:
        raise UnsafeArchive(f"the zip file is damaged or uses an unsupported compression ({exc})") from exc
    return PurePosixPath(weights.filename).name


def _check_directory(archive: Path | IO[bytes], *, max_files: int) -> None:
    """Refuse a central directory bigger than `max_files` entries need, from the zip's end record alone:
    zipfile builds an object per entry before anything can count them (~8x the upload's size in memory),
    walking the directory by its size, whatever entry count the end record states."""
    with open(archive, "rb") if isinstance(archive, Path) else nullcontext(archive) as fp:
        directory = directory_size(fp)
    if directory is None:
        return  # not a zip: zipfile says so
    entries, size = directory
    if entries > max_files:
        raise UnsafeArchive(f"the zip holds {entries} entries; at most {max_files} are allowed")
    if size > max_files * MAX_ENTRY_BYTES:
        raise UnsafeArchive(
            f"the zip's directory is {size} bytes; {max_files} entries need at most {max_files * MAX_ENTRY_BYTES}"
        )


def checked_members(zf: zipfile.ZipFile, *, max_bytes: int, max_files: int) -> list[zipfile.ZipInfo]:
    """Return the archive's entries after refusing absolute paths, `..`, links, encryption, more than
    `max_files` entries and more than `max_bytes` uncompressed bytes (as the headers declare them)."""
    members = zf.infolist()
    if len(members) > max_files:
        raise UnsafeArchive(f"the zip holds {len(members)} entries; at most {max_files} are allowed")
    for member in members:
        _check_member(member)
    declared = sum(member.file_size for member in members)
    if declared > max_bytes:
        raise UnsafeArchive(f"the zip unpacks to {declared} bytes; at most {max_bytes} are allowed")
    return members


def _check_member(member: zipfile.ZipInfo) -> None:
    name = member.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"the zip entry {name!r} has an absolute path")
    if ".." in parts:
        raise UnsafeArchive(f"the zip entry {name!r} points outside the archive ('..')")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise UnsafeArchive(f"the zip entry {name!r} is a symbolic link")
    if member.flag_bits & 0x1:
        raise UnsafeArchive(f"the zip entry {name!r} is encrypted")


def adapter_files(members: list[zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo]:
    """Return the entries of the one adapter folder's config and weights; raise UnsafeArchive unless the
    archive holds exactly one folder with an adapter_config.json, and weights beside it."""
    files = [m for m in members if not m.is_dir()]
    configs = [m for m in files if PurePosixPath(m.filename).name == ADAPTER_CONFIG]
    if not configs:
        raise UnsafeArchive(f"the zip holds no {ADAPTER_CONFIG} (zip a PEFT adapter folder)")
    if len(configs) > 1:
        folders = ", ".join(sorted(str(PurePosixPath(m.filename).parent) for m in configs))
        raise UnsafeArchive(f"the zip holds {len(configs)} adapter folders ({folders}); upload one at a time")
    root = PurePosixPath(configs[0].filename).parent
    beside = {PurePosixPath(m.filename).name: m for m in files if PurePosixPath(m.filename).parent == root}
    for name in WEIGHTS_FILES:
        if name in beside:
            return configs[0], beside[name]
    raise UnsafeArchive(f"no {' or '.join(WEIGHTS_FILES)} beside {configs[0].filename}")


def _copy_bounded(zf: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: list[int]) -> None:
    """Copy one entry, counting the bytes really unpacked: a header may lie about the size."""
    with zf.open(member) as source, open(target, "xb") as out:
        while chunk := source.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UnsafeArchive("the zip unpacks to more bytes than its headers declare, over the limit")
            out.write(chunk)
