"""Does xgrammar's compile_json_schema release the GIL? Compiles a schema of N optional string properties
(~2 N values) on a thread while the main thread spins a Python loop; if the compile held the GIL, the
loop's longest gap between iterations would be about the compile's whole time.

Run: .venv/bin/python bench/grammar_gil.py [--properties 250] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from gpu_worker.structured.grammar import GrammarCompiler  # noqa: E402
from gpu_worker.structured.schema import measure  # noqa: E402
from gpu_worker.tokenization.tokenizer import Tokenizer  # noqa: E402


def schema_of(properties: int, salt: int) -> str:
    """Return a schema of `properties` optional strings, named apart by `salt` so that no compile is a hit."""
    return json.dumps(
        {"type": "object", "properties": {f"p{salt}_{i}": {"type": "string"} for i in range(properties)}}
    )


def spin(done: threading.Event) -> tuple[int, float]:
    """Count loop iterations until `done`; return the count and the longest gap between two (seconds)."""
    count, longest, last = 0, 0.0, time.perf_counter()
    while not done.is_set():
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
        count += 1
    return count, longest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--properties", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tok = Tokenizer.gpt2_fallback()
    table = [b"" if i in tok.special_token_ids else tok.token_bytes(i) for i in range(tok.vocab_size)]
    compiler = GrammarCompiler(table, tok.vocab_size, tok.eos_token_ids, cache_size=0)
    print(f"schema values: {measure(json.loads(schema_of(args.properties, 0)))[1]}")
    done = threading.Event()
    _, idle_gap = spin_for(0.2)
    rows = []
    for salt in range(1, args.repeats + 1):
        schema = schema_of(args.properties, salt)
        start = time.perf_counter()
        compiler.compile(schema)
        alone = time.perf_counter() - start
        done.clear()
        times: list[float] = []

        def compile_on_thread(schema: str = schema + " ", times: list[float] = times) -> None:
            begun = time.perf_counter()
            compiler.compile(schema)
            times.append(time.perf_counter() - begun)
            done.set()

        thread = threading.Thread(target=compile_on_thread)
        thread.start()
        count, longest = spin(done)
        thread.join()
        rows.append(
            {
                "compile alone ms": alone * 1e3,
                "compile on thread ms": times[0] * 1e3,
                "main loop iterations": count,
                "longest main gap ms": longest * 1e3,
                "idle longest gap ms": idle_gap * 1e3,
            }
        )
    print_table(rows)
    write_json("grammar_gil", {"properties": args.properties, "rows": rows})


def spin_for(seconds: float) -> tuple[int, float]:
    """Spin with no compile running for `seconds` (the loop's own longest gap, for comparison)."""
    done = threading.Event()
    timer = threading.Timer(seconds, done.set)
    timer.start()
    return spin(done)


if __name__ == "__main__":
    main()
