"""What the adapter registry and the loaders read of a zip before trusting zipfile or torch.load with it:
zipfile builds an object per entry of the central directory before anything can count them, and torch.load
inflates each compressed record of torch's zip format whole (torch.save stores them uncompressed)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from typing import IO


def directory_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """Return (entries, bytes) of the zip's central directory as its end record states them, read from the
    end of `fp` alone (which is left at its start); None when `fp` holds no zip."""
    end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]
    fp.seek(0)
    if end is None:
        return None
    return end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]


def first_compressed(members: Iterable[zipfile.ZipInfo]) -> str | None:
    """Return the name of the first member stored compressed, or None."""
    return next((m.filename for m in members if m.compress_type != zipfile.ZIP_STORED), None)
