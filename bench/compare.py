"""Before/after table of two bench/all.py results: Ruvon's figure in each, their ratio, slow rows flagged.

Run: python bench/compare.py OUT/before.json OUT/after.json [--threshold 0.03]

Rows are matched by workload. "speed" is after's speed over before's (above 1: after is faster), from
ms/token and µs (lower is better) or tokens/s (higher is better); a row whose after takes more than
--threshold longer than before (3% by default) is flagged SLOWER, one that before measured and after did
not (refused, failed, absent) MISSING, and the exit status is then 1. The header gives each run's commit,
GPU, clocks and copy bandwidth: different machines make the ratios moot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.all import describe_run  # noqa: E402


def speed(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Return after's speed over before's for one row, or None where either was not measured."""
    a, b = before.get("ruvon"), after.get("ruvon")
    if not a or not b:
        return None
    return a / b if after["better"] == "lower" else b / a


def verdict(before: dict[str, Any] | None, after: dict[str, Any] | None, threshold: float) -> str:
    """Return the row's flag: SLOWER past the threshold, MISSING where after lost a row before measured."""
    if before is None or before.get("ruvon") is None:
        return "new in after" if after and after.get("ruvon") is not None else ""
    if after is None or after.get("ruvon") is None:
        return "**MISSING in after**"
    ratio = speed(before, after)
    if ratio is not None and ratio < 1 / (1 + threshold):
        return f"**SLOWER {100 * (1 / ratio - 1):.1f}%**"
    return ""


def fmt(row: dict[str, Any] | None) -> str:
    if row is None:
        return "absent"
    if row.get("ruvon") is None:
        return "not recorded"
    value = row["ruvon"]
    return f"{value:,.0f}" if row["metric"] == "tokens/s" else f"{value:.2f}"


def table(before: dict[str, Any], after: dict[str, Any], threshold: float) -> tuple[list[str], int]:
    """Return the markdown lines and how many rows are flagged (slower, or missing in after)."""
    old = {r["key"]: r for r in before["rows"]}
    new = {r["key"]: r for r in after["rows"]}
    keys = list(old) + [k for k in new if k not in old]
    lines = [
        f"| workload | unit | {before['label']} | {after['label']} | speed {after['label']} / {before['label']} | |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    flagged = 0
    for key in keys:
        a, b = old.get(key), new.get(key)
        ratio = speed(a, b) if a and b else None
        flag = verdict(a, b, threshold)
        flagged += flag.startswith("**")
        unit = (a or b or {}).get("metric", "")
        shown = "-" if ratio is None else f"{ratio:.3f}"
        lines.append(f"| {key} | {unit} | {fmt(a)} | {fmt(b)} | {shown} | {flag} |")
    return lines, flagged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument(
        "--threshold", type=float, default=0.03, help="flag rows this much slower (0.03 = 3%%)"
    )
    args = parser.parse_args()
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    lines, flagged = table(before, after, args.threshold)
    print(f"# {after['label']} against {before['label']}\n")
    print(f"- {describe_run(before)}\n- {describe_run(after)}\n")
    print("\n".join(lines))
    print(
        f"\n{flagged} row(s) flagged: more than {100 * args.threshold:g}% slower, or missing in {after['label']}"
    )
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
