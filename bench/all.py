"""Runs the GPU benches of one source tree: latency, throughput and kernels_bench, one process per bench
and shape, and writes every row to OUT/<label>.json and a docs/parts/09-style table to OUT/<label>.md.

Run on a GPU: python bench/all.py --out var/bench --label now
(shapes gpt2 and gpt2-xl, --decode-steps 1 and 8, the HF peer beside Ruvon). A before/after comparison of
two commits on one machine, Ruvon against Ruvon:

    git archive cfdb967 | tar -x -C .before          # the older tree, exported (not a checkout)
    python bench/all.py --out OUT --tree .before --label before --commit cfdb967 --no-peer
    python bench/all.py --out OUT --label after --no-peer
    python bench/compare.py OUT/before.json OUT/after.json

--tree runs that tree's own bench scripts with its own packages (cwd and PYTHONPATH point at it), passing
only the flags a script accepts (its source, or its bench/common.py, names them): a tree whose latency.py
has no --skip-hf runs its peer anyway; one whose kernels_bench.py has no --shape runs once for all shapes.
Rows are read from the tree's bench/results/<bench>.json, so benches that predate this script work
unchanged; where they record no run info (commit, GPU, clocks, copy bandwidth), this tree's
bench/common.py measures it once, in a child process, at the start. The parent never touches the GPU, so
it holds no device memory while the benches run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REFUSED_EXIT, ROOT, source_commit  # noqa: E402

SCRIPTS = {"latency": "latency.py", "throughput": "throughput.py", "kernels": "kernels_bench.py"}
RESULT_NAMES = {"latency": "latency", "throughput": "throughput", "kernels": "kernels_bench"}
MIN_PROCESS_S = 30  # with less of --budget left, a bench process is not started
FLOOR_WARNING = "the KV cache gets the minimum of"  # what the engine logs, at cfdb967 as now


def accepts(tree: Path, bench: str, flag: str) -> bool:
    """Return whether the tree's script for bench (or its shared bench/common.py) defines flag."""
    texts = [tree / "bench" / SCRIPTS[bench], tree / "bench" / "common.py"]
    return any(f'"{flag}"' in path.read_text() for path in texts if path.exists())


def tree_commit(tree: Path, given: str | None) -> str:
    """Return the commit a tree's rows are labelled with: --commit, else git if tree is a checkout.

    $RUVON_COMMIT names the tree this script belongs to, so only that tree falls back on it.
    """
    return given or source_commit(tree, use_env=tree == ROOT)


def child_env(tree: Path, commit: str) -> dict[str, str]:
    """Return the environment of a bench process run from tree: its packages first, its commit."""
    others = [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT
    ]
    pythonpath = os.pathsep.join([str(tree.resolve()), *others])
    return {**os.environ, "PYTHONPATH": pythonpath, "RUVON_COMMIT": commit, "PYTHONUNBUFFERED": "1"}


def bench_args(args: argparse.Namespace, tree: Path, bench: str, shape: str | None) -> list[str]:
    """Return the arguments for one bench process, keeping to the flags the tree's script accepts."""
    out = ["--shape", shape] if shape else []
    if bench == "kernels":
        return out + shlex.split(args.kernels_args)
    for steps in args.decode_steps:
        out += ["--decode-steps", str(steps)]
    out += ["--device", args.device, "--dtype", args.dtype]
    if args.no_peer and accepts(tree, bench, "--skip-hf"):
        out.append("--skip-hf")
    return out + shlex.split(getattr(args, f"{bench}_args"))


def check_extra_flags(args: argparse.Namespace, tree: Path, benches: list[str]) -> None:
    """Exit before running anything if a tree's script does not take a flag asked for explicitly."""
    for bench in benches:
        for token in shlex.split(getattr(args, f"{bench}_args")):
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and not accepts(tree, bench, flag):
                sys.exit(f"{tree}/bench/{SCRIPTS[bench]} does not accept {flag}")


def stream(cmd: list[str], tree: Path, env: dict[str, str], timeout: float) -> tuple[int, bool]:
    """Run cmd, echoing its output; return (exit status, whether it logged a KV cache at the floor)."""
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    at_floor = False
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        at_floor |= FLOOR_WARNING in line
    rc = proc.wait()
    timer.cancel()
    return rc, at_floor


def run_bench(
    args: argparse.Namespace, tree: Path, env: dict[str, str], bench: str, shape: str | None, timeout: float
) -> tuple[dict[str, Any] | None, str, int]:
    """Run one bench process; return (its results payload or None, the command as run, the exit status).

    Where the engine logged that its KV cache fell to the floor, every row of the payload is refused:
    benches that predate the floor check record such rows as if they were valid.
    """
    result = tree / "bench" / "results" / f"{RESULT_NAMES[bench]}.json"
    result.unlink(missing_ok=True)
    argv = bench_args(args, tree, bench, shape)
    command = " ".join(["python", f"bench/{SCRIPTS[bench]}", *map(shlex.quote, argv)])
    print(f"\n=== {args.label}: {command}", flush=True)
    start = time.perf_counter()
    rc, at_floor = stream([sys.executable, str(tree / "bench" / SCRIPTS[bench]), *argv], tree, env, timeout)
    print(f"=== exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
    payload = json.loads(result.read_text()) if result.exists() else None
    if payload is not None and at_floor:
        why = f"{bench} {shape}: refused, the engine logged that its KV cache fell to the floor"
        payload["rows"] = [{"shape": r.get("shape", shape), "refused": why} for r in payload.get("rows", [])]
    return payload, command, rc


def number(value: Any) -> float | None:
    """Return value as a finite float, or None (a peer's failure text, NaN, a missing figure)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def row(
    bench: str, workload: str, metric: str, better: str, ruvon: Any, peer: Any, peer_name: str
) -> dict[str, Any]:
    """Return one normalised row: Ruvon's and the peer's figure and Ruvon's speed-up over the peer."""
    r, p = number(ruvon), number(peer)
    ratio = None if r is None or p is None or not r or not p else (p / r if better == "lower" else r / p)
    return {
        "key": f"{bench}: {workload}",
        "bench": bench,
        "workload": workload,
        "metric": metric,
        "better": better,
        "ruvon": r,
        "peer": p,
        "peer_name": peer_name,
        "ratio": ratio,
    }


def latency_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    a = payload["args"]
    out = []
    for r in payload["rows"]:
        what = f"batch-1 decode, {a['prompt_len']}-token prompt, {a['new_tokens']} new tokens, {a['dtype']}"
        workload = f"{r['shape']} {what}, decode_steps {r.get('decode_steps', '-')}"
        out.append(
            row("latency", workload, "ms/token", "lower", r.get("ruvon_ms_tok"), r.get("hf_ms_tok"), "HF")
        )
        out[-1] |= {"shape": r["shape"], "raw": r}
    return out


def throughput_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    a = payload["args"]
    out = []
    for r in payload["rows"]:
        what = f"{a['requests']} requests, prompts {a['min_prompt']}-{a['max_prompt']}, {a['new_tokens']} new"
        workload = f"{r['shape']} {what}, {a['dtype']}, decode_steps {r.get('decode_steps', '-')}"
        peer = r.get("hf_tok_s")
        out.append(row("throughput", workload, "tokens/s", "higher", r.get("ruvon_tok_s"), peer, "HF paged"))
        out[-1] |= {"shape": r["shape"], "raw": r}
        if isinstance(peer, str):
            out[-1]["peer_note"] = peer
    return out


def kernel_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the decode, prefill and linear rows: graph time of Ruvon's kernel against torch's."""
    out = []
    for r in payload.get("decode", []):
        workload = f"paged attention decode {r['model']} B={r['batch']} L={r['context']}"
        out.append(row("kernels", workload, "µs", "lower", r["graph_us"], r["sdpa_graph_us"], "SDPA dense"))
        out[-1] |= {"shape": r["model"], "raw": r}
    for r in payload.get("prefill", []):
        workload = f"paged attention prefill gpt2 B={r['batch']} chunk={r['chunk']} prefix={r['prefix']}"
        out.append(row("kernels", workload, "µs", "lower", r["graph_us"], r["sdpa_graph_us"], "SDPA dense"))
        out[-1] |= {"shape": "gpt2", "raw": r}
    for r in payload.get("linear", []):
        workload = f"small-M linear {r['model']} {r['N']}x{r['K']} M={r['M']}"
        out.append(row("kernels", workload, "µs", "lower", r["triton_us"], r["cublas_us"], "cuBLAS"))
        out[-1] |= {"shape": r["model"], "raw": r}
    return out


def rows_of(bench: str, payload: dict[str, Any] | None, shape: str | None, rc: int) -> list[dict[str, Any]]:
    """Return the normalised rows of one bench process; a refused or failed one keeps a row saying so."""
    if payload is None:
        return [
            {"key": f"{bench}: {shape or 'all shapes'}", "bench": bench, "shape": shape}
            | {"failed": f"exit {rc}, no results"}
        ]
    normalise = {"latency": latency_rows, "throughput": throughput_rows, "kernels": kernel_rows}[bench]
    measured = [r for r in payload.get("rows", []) if "refused" not in r and "failed" not in r]
    rows = normalise({**payload, "rows": measured})
    for r in payload.get("rows", []):
        if "refused" in r or "failed" in r:
            why = {k: r[k] for k in ("refused", "failed", "run") if k in r}
            rows.append({"key": f"{bench}: {r.get('shape')}", "bench": bench, "shape": r.get("shape"), **why})
    run = payload.get("run")
    for r in rows:
        r.setdefault("run", (r.get("raw") or {}).get("run") or run)
        (r.get("raw") or {}).pop("run", None)
    return rows


def measure_run_info(args: argparse.Namespace, commit: str) -> dict[str, Any] | None:
    """Return this tree's run_info() from a child process (for trees whose benches record none)."""
    cmd = [sys.executable, str(ROOT / "bench" / "common.py"), "--device", args.device]
    env = child_env(ROOT, commit)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "tokens/s" and value >= 100:
        return f"{value:,.0f} {metric}"
    return f"{value:.2f} {metric}" if value < 100 else f"{value:.0f} {metric}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def describe_run(result: dict[str, Any]) -> str:
    """Return one line naming a result's commit, GPU, clocks at the start and copy bandwidth."""
    run = result.get("run") or {}
    gpu = (run.get("gpu") or {}).get("name", run.get("device", "?"))
    clocks = (
        "; ".join(f"SM {c['sm']}, memory {c['mem']}" for c in run.get("clocks") or []) or "clocks unknown"
    )
    copy = f"device copy {run.get('copy_gb_s')} GB/s (read + write)"
    return f"{result['label']}: commit {result['commit']}, {gpu} ({clocks}), {copy}"


def markdown(result: dict[str, Any]) -> str:
    """Return result as docs/parts/09's table: workload | Ruvon | HF | ratio | command."""
    lines = [
        f"# bench/all.py: {result['label']}",
        "",
        f"{describe_run(result)}; tree `{result['tree']}`, finished {result['finished']}",
        "",
        "| workload | Ruvon | HF | ratio | command |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        command = f"`{r.get('command', '')}`"
        if "ruvon" not in r:
            why = r.get("refused") or r.get("failed")
            lines.append(f"| {r['key']} | not recorded: {why} | | | {command} |")
            continue
        peer = fmt(r["peer"], r["metric"])
        peer = f"{peer} ({r['peer_name']})" if r["peer"] is not None and r["bench"] == "kernels" else peer
        peer = r.get("peer_note", peer)
        line = f"| {r['workload']} | {fmt(r['ruvon'], r['metric'])} | {peer} | {fmt_ratio(r['ratio'])} | {command} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict[str, Any]) -> None:
    """Write the rows so far: a run cut short still leaves what it measured."""
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['label']}.json").write_text(json.dumps(result, indent=1))
    (out / f"{result['label']}.md").write_text(markdown(result))


def plan(args: argparse.Namespace, tree: Path) -> list[tuple[str, str | None]]:
    """Return the (bench, shape) processes to run; kernels_bench without --shape runs once."""
    steps: list[tuple[str, str | None]] = []
    for bench in args.bench:
        if bench == "kernels" and args.device != "cuda":
            print("kernels_bench needs CUDA: skipped", flush=True)
        elif bench == "kernels" and not accepts(tree, bench, "--shape"):
            steps.append((bench, None))
        else:
            steps += [(bench, shape) for shape in args.shape]
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for <label>.json and <label>.md")
    parser.add_argument("--label", default="run", help="names the output files, e.g. before / after")
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="source tree whose benches run (default: this one)"
    )
    parser.add_argument(
        "--commit", help="commit the tree's rows are labelled with (default: git, else unknown)"
    )
    parser.add_argument("--shape", action="append", help="default: gpt2 and gpt2-xl")
    parser.add_argument("--decode-steps", type=int, action="append", help="default: 1 and 8")
    parser.add_argument("--bench", action="append", choices=list(SCRIPTS), help="default: all three")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--no-peer", action="store_true", help="skip the HF peer where a script allows it")
    parser.add_argument("--latency-args", default="", help='extra latency.py flags, e.g. "--new-tokens 16"')
    parser.add_argument(
        "--throughput-args", default="", help='extra throughput.py flags, e.g. "--requests 8"'
    )
    parser.add_argument("--kernels-args", default="--quick", help="kernels_bench.py flags (default --quick)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per bench process")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole call (0: no limit)")
    args = parser.parse_args(argv)
    args.shape = args.shape or ["gpt2", "gpt2-xl"]
    args.decode_steps = args.decode_steps or [1, 8]
    args.bench = args.bench or list(SCRIPTS)
    return args


def main() -> None:
    args = parse_args()
    tree = args.tree.resolve()
    check_extra_flags(args, tree, [b for b in args.bench if b != "kernels"])
    commit = tree_commit(tree, args.commit)
    env = child_env(tree, commit)
    result: dict[str, Any] = {"label": args.label, "tree": str(args.tree), "commit": commit, "rows": []}
    common = tree / "bench" / "common.py"
    if not (common.exists() and "def run_info" in common.read_text()):
        result["run"] = measure_run_info(args, commit)  # the tree's benches record none: measure it here
        if result["run"]:
            result["run"]["commit"] = commit
    deadline = time.monotonic() + (args.budget or float("inf"))
    for bench, shape in plan(args, tree):
        left = deadline - time.monotonic()
        if left < MIN_PROCESS_S:
            why = f"not run: the --budget of {args.budget:.0f} s was spent"
            result["rows"].append({"key": f"{bench}: {shape}", "bench": bench, "shape": shape, "failed": why})
            continue
        payload, command, rc = run_bench(args, tree, env, bench, shape, min(args.timeout, left))
        rows = rows_of(bench, payload, shape, rc)
        rows = [r for r in rows if r.get("shape") in args.shape or r.get("shape") is None]
        for r in rows:
            r |= {"label": args.label, "commit": commit, "command": command}
            r["run"] = r.get("run") or result.get("run")
        result["rows"] += rows
        result["run"] = result.get("run") or next((r["run"] for r in rows if r.get("run")), None)
        write(args.out, result)
    write(args.out, result)
    print(f"\nwrote {args.out / (args.label + '.json')} and .md ({len(result['rows'])} rows)")
    sys.exit(0 if all("ruvon" in r for r in result["rows"]) else REFUSED_EXIT)


if __name__ == "__main__":
    main()
