"""Checkpoint readers: each turns files on disk into a ModelConfig and a stream of HF-named tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_worker.errors import ModelLoadError

if TYPE_CHECKING:
    from gpu_worker.layers.base import CheckpointTensor


@dataclass
class Checkpoint:
    """A lazy stream of (HF-style name, tensor) pairs, with its size for the progress bar; a tensor may arrive
    quantised (QuantizedTensor) when the loader asked the reader to keep it so."""

    tensors: Iterator[tuple[str, CheckpointTensor]]
    count: int
    nbytes: int


def reject_unsupported(source: Path, problems: dict[str, bool]) -> None:
    """Raise ModelLoadError naming every feature flagged True in `problems`."""
    bad = [feature for feature, present in problems.items() if present]
    if bad:
        raise ModelLoadError(f"{source} uses features Ruvon does not implement: {', '.join(bad)}")
