"""Programmatic dependent launch (PDL, compute capability 9.0 and newer): a decode kernel may start while
the kernel before it in the stream is still finishing.

A batch-1 decode step of GPT-2 XL is a chain of about 430 short kernels (nine a layer), and between two of
them the GPU idles while the next one launches. Launched with PDL, a kernel's programs may be scheduled as
soon as every program of the kernel before it has called `gdc_launch_dependents` (or exited). They
first load what no kernel writes (a projection's first weight tile, a norm's weight), then call
`gdc_wait`, which returns once the kernel before has finished and its writes are visible, and only then
read activations or the KV cache. The wait is what keeps it correct, so every kernel launched with PDL
waits before its first such read. As each waits for the one before, a wait that returns means all earlier
work in the stream is done; a kernel launched without PDL after one of ours is ordered as always.

RUVON_PDL=1 turns it on; it stays off by default until its GPU run (bench/device_round.sh's -pdl steps, each
beside the same row without it) has shown it changes no token and saves time. Off on older GPUs, on CPU and
under TRITON_INTERPRET, where the kernels take USE_PDL=False and never reach the instructions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    _jit: Callable[[Any], Any] = triton.jit
except ImportError:  # a CPU-only install has no Triton; no kernel calls the helper below there
    tl = None

    def _jit(fn: Any) -> Any:
        return fn


@_jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    # Called by a PDL-aware kernel after its loads of what no kernel writes and before its first read of
    # anything the kernel before it may have written; then lets the next kernel's programs be scheduled.
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _has_instructions() -> bool:
    return (
        tl is not None
        and hasattr(tl.extra.cuda, "gdc_wait")
        and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    )


@functools.cache
def _enabled(device_index: int) -> bool:
    if os.environ.get("RUVON_PDL", "0") != "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _has_instructions() and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Return whether kernels on `device` launch with PDL."""
    if device.type != "cuda":
        return False
    return _enabled(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict[str, Any]:
    """Return the launch keywords of a PDL-aware kernel: its USE_PDL constexpr and, when on, the launch flag."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
