"""Where one decode step's time goes: host phases (schedule, prepare, model, postprocess, outputs) and GPU ops.

Run on a GPU: python bench/profile_step.py --shape gpt2 --batch 1 --batch 512

Decode-only steps are chained launches on CUDA (async_decode): "launch_decode" is the host's time to queue one,
"collect" its wait for the device plus the read-back; the step's wall time is what counts. On CPU steps are
scheduled ones unless --async-decode asks for the launch path (its launch_decode then runs the model inline).
"host" sums the phases that are the host's own work (all but run, launch_decode and collect).
An engine whose KV cache fell to the floor (another still held memory) is refused: its batch is not profiled.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REFUSED_EXIT, floor_refusal, print_table, release, run_info, write_json  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402

PHASES = {
    "schedule": ("scheduler", "schedule"),
    "schedule_launch": ("scheduler", "schedule_launch"),
    "prepare": ("runner", "prepare"),
    "run (model+sample+sync)": ("runner", "run"),
    "launch_decode (queue)": ("runner", "launch_decode"),
    "collect (wait + read)": ("runner", "collect"),
    "postprocess": ("scheduler", "postprocess"),
    "append_token": ("outputs", "append_token"),
    "advance": ("scheduler", "advance"),
    "outputs": ("engine", "_output"),
}
DEVICE_PHASES = ("run (model+sample+sync)", "launch_decode (queue)", "collect (wait + read)")


def instrument(engine: LLMEngine, totals: dict[str, float]) -> None:
    """Wrap each phase's method so its wall time accumulates into totals."""
    owners = {
        "engine": engine,
        "scheduler": engine.scheduler,
        "runner": engine.runner,
        "outputs": engine.outputs,
    }
    for label, (owner_name, method) in PHASES.items():
        owner = owners[owner_name]
        original: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, _f: Callable[..., Any] = original, _l: str = label, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                totals[_l] += time.perf_counter() - start

        setattr(owner, method, timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=1)
    parser.add_argument(
        "--async-decode", action="store_true", help="chained launches on CPU too (CUDA's path)"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"run": run_info(device)}
    for batch in args.batch or [1]:
        engine = LLMEngine(
            EngineConfig(
                model=f"random:{args.shape}",
                device=device,
                max_num_seqs=max(batch, 1),
                max_num_batched_tokens=max(8192, args.prompt_len * 4),
                decode_steps=args.decode_steps,
                async_decode=True if args.async_decode else None,
            )
        )
        refused = floor_refusal(engine, f"profile {args.shape} batch {batch}")
        if refused:
            print(refused, flush=True)
            results[f"batch{batch}"] = {"refused": refused}
            del engine
            release()
            continue
        rng = random.Random(0)
        params = SamplingParams(
            temperature=0.0, max_tokens=(args.steps + 20) * args.decode_steps, ignore_eos=True
        )
        for i in range(batch):
            engine.add_request(f"r{i}", [rng.randrange(50257) for _ in range(args.prompt_len)], params)
        prefill_steps = 0
        while engine.scheduler.num_waiting or any(
            s.num_uncomputed_tokens > 1 for s in engine.scheduler.running
        ):
            engine.step()  # finish prefill
            prefill_steps += 1
        for _ in range(5):
            engine.step()
        print(f"prefill took {prefill_steps} steps; {len(engine.scheduler.running)} running", flush=True)
        totals: dict[str, float] = defaultdict(float)
        instrument(engine, totals)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with (
            torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            if device == "cuda"
            else _null() as prof
        ):
            for _ in range(args.steps):
                engine.step()
        step_ms = (time.perf_counter() - start) * 1e3 / args.steps
        rows = [{"phase": k, "ms_per_step": v * 1e3 / args.steps} for k, v in totals.items()]
        host = sum(v for k, v in totals.items() if k not in DEVICE_PHASES)
        rows.append({"phase": "host", "ms_per_step": host * 1e3 / args.steps})
        rows.append({"phase": "whole step", "ms_per_step": step_ms})
        running = len(engine.scheduler.running)
        print(f"\n{engine.label}, batch {batch} ({running} running), {args.steps} decode steps (profiler on)")
        print_table(rows)
        if prof is not None:
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
            )
        results[f"batch{batch}"] = rows
        # The next engine sizes its KV cache from free memory: this one's must really be gone first.
        del engine, prof
        release()
    print("wrote", write_json(f"profile_{args.shape}", results))
    if any(isinstance(v, dict) and "refused" in v for v in results.values()):
        sys.exit(REFUSED_EXIT)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
