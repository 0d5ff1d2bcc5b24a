"""What a process runs, as GET /version shows it: Ruvon's version and, for an engine, torch's and the device."""

from __future__ import annotations

import importlib.metadata
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@cache
def ruvon_version() -> str:
    """Return Ruvon's version: the installed package's, else the source tree's pyproject.toml."""
    try:
        return importlib.metadata.version("ruvon")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def engine_versions(device: Any) -> dict[str, str | None]:
    """Return what an engine runs on: Ruvon, torch (and its CUDA) and the device (torch is imported here, so
    the web tier can read ruvon_version() without it)."""
    import torch

    return {
        "ruvon": ruvon_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
