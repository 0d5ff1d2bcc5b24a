"""Small helpers shared by the benchmarks: timing, tables, JSON results, the machine a run is on.

Every bench row records `run_info()`: the source commit, the GPU and its clocks, and the device's copy
bandwidth measured at the start of the run. A bench refuses a row whose engine's KV cache fell to the
floor (`floor_refusal`), and runs each of several `--shape`s in its own child process
(`rows_from_children`), so no engine is sized while another still holds device memory.

`python bench/common.py [--device cuda]` prints `run_info()` as JSON (bench/all.py uses it for trees whose
benches do not record it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kernels.pdl import pdl_enabled

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
REFUSED_EXIT = 3  # a bench's exit status when some row was refused or a child failed


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Return (best wall seconds over `repeat` runs, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the throughput workload's options: 512 requests, prompts of 32-256 tokens, 128 new tokens."""
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)


def add_decode_steps_argument(parser: argparse.ArgumentParser) -> None:
    """Add --decode-steps (repeatable): tokens per sequence per decode launch, one result row each."""
    parser.add_argument("--decode-steps", type=int, action="append", default=None)


def workload(num: int, lo: int, hi: int, vocab: int = 50257, seed: int = 0) -> list[list[int]]:
    """Return `num` random prompts with lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print rows as an aligned text table."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write results with the machine they came from; return the file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def source_commit(root: Path = ROOT, use_env: bool = True) -> str:
    """Return the commit of the source tree at root: $RUVON_COMMIT when set (a copied tree's git, as on the
    GPU machine, can name a stale commit), else git if root is a checkout, else "unknown".

    A checkout with uncommitted changes to tracked files reads "<sha>-dirty".
    """
    if use_env and os.environ.get("RUVON_COMMIT"):
        return os.environ["RUVON_COMMIT"]
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        lines = top.stdout.split()
        # An exported tree inside another checkout (e.g. .before/) must not take that checkout's HEAD.
        if top.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == root.resolve():
            dirty = subprocess.run(["git", "-C", str(root), "diff-index", "--quiet", "HEAD"], timeout=10)
            return lines[1] + ("-dirty" if dirty.returncode else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def gpu_properties() -> dict[str, Any] | None:
    """Return the current CUDA device's name, memory, SM count and capability; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    props: dict[str, Any] = {
        "name": p.name,
        "total_memory_gib": round(p.total_memory / 2**30, 1),
        "multi_processor_count": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
    }
    for field in ("L2_cache_size", "clock_rate", "memory_clock_rate"):  # not in every torch version
        if hasattr(p, field):
            props[field] = getattr(p, field)
    return props


def gpu_clocks() -> list[dict[str, str]] | None:
    """Return each GPU's current SM and memory clocks from nvidia-smi; None where it is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",") for line in out.strip().splitlines()]
    return [{"sm": sm.strip(), "mem": mem.strip()} for sm, mem in rows if mem]


def copy_gb_s(device: str) -> float:
    """Return the device's copy bandwidth in GB/s, bytes read plus written, from a large copy_ (2 GiB on CUDA)."""
    cuda = torch.device(device).type == "cuda"
    src = torch.randn(2**29 if cuda else 2**24, device=device)
    dst = torch.empty_like(src)
    best, _ = timed(functools.partial(dst.copy_, src), repeat=10)
    gb = 2 * src.numel() * src.element_size() / 1e9
    del src, dst
    release()
    return gb / best


def run_info(device: str) -> dict[str, Any]:
    """Return what a row's numbers depend on besides the code: commit, GPU, clocks, copy bandwidth."""
    bandwidth = copy_gb_s(device)  # first, so the clocks below are read with the GPU awake
    return {
        "commit": source_commit(),
        "device": device,
        "gpu": gpu_properties(),
        "clocks": gpu_clocks(),
        "copy_gb_s": round(bandwidth, 1),
        "pdl": pdl_enabled(torch.device(device)),  # kernels/pdl.py: on with RUVON_PDL=1
    }


def release() -> None:
    """Free what deleted engines and models held, so the next engine sizes its KV cache from real memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def floor_refusal(engine: Any, what: str) -> str | None:
    """Return why rows measured on engine must not be reported (its KV cache is at the floor), else None."""
    if not engine.kv_cache_at_floor:
        return None
    free = f" ({torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free)" if torch.cuda.is_available() else ""
    return f"{what}: refused, its KV cache fell to the minimum-block floor: device memory was short{free}"


def exit_if_at_floor(engine: Any, what: str) -> None:
    """For a bench of one engine: print why and exit with REFUSED_EXIT when its KV cache is at the floor."""
    refused = floor_refusal(engine, what)
    if refused:
        print(refused, flush=True)
        sys.exit(REFUSED_EXIT)


def is_measured(row: dict[str, Any]) -> bool:
    return "refused" not in row and "failed" not in row


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Print measured rows as a table (nested run info left out), then one line per refused or failed row."""
    print_table([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows if is_measured(r)])
    for r in rows:
        if not is_measured(r):
            print(f"NOT RECORDED {r.get('shape', '')}: {r.get('refused') or r.get('failed')}")


def without_shapes(argv: list[str]) -> list[str]:
    """Return argv without its --shape options (both `--shape X` and `--shape=X`)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--shape":
            skip = True
        elif not arg.startswith("--shape="):
            out.append(arg)
    return out


def rows_from_children(script: str, name: str, shapes: list[str]) -> list[dict[str, Any]]:
    """Re-run script once per shape, each in its own process, and return all their rows.

    A child writes results/<name>.json as a one-shape run does; a child that fails leaves a "failed" row.
    """
    rows: list[dict[str, Any]] = []
    path = RESULTS / f"{name}.json"
    for shape in shapes:
        path.unlink(missing_ok=True)
        cmd = [sys.executable, script, *without_shapes(sys.argv[1:]), "--shape", shape]
        print(f"--- {shape}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc in (0, REFUSED_EXIT) and path.exists():
            rows += json.loads(path.read_text())["rows"]
        else:
            rows.append({"shape": shape, "failed": f"child process exited {rc}"})
    return rows


def exit_status(rows: list[dict[str, Any]]) -> int:
    """Return 0 when every row was measured, REFUSED_EXIT otherwise."""
    return 0 if all(is_measured(r) for r in rows) else REFUSED_EXIT


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="print run_info() as JSON")
    cli.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(run_info(cli.parse_args().device)))
