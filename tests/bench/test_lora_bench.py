"""bench/lora.py end to end on the tiny random GPT-2 on CPU: every engine of it runs and every number of
its row comes out (the GPU run is the lead's; this keeps the script from rotting)."""

from __future__ import annotations

import argparse

import pytest

from bench import lora


@pytest.mark.slow
def test_the_lora_bench_measures_every_part_on_tiny() -> None:
    args = argparse.Namespace(
        device="cpu",
        dtype="float32",
        requests=6,
        adapters=3,
        max_loras=3,
        targets="c_attn,c_proj,c_fc",
        min_prompt=8,
        max_prompt=12,
        new_tokens=3,
        prompt_len=8,
        latency_tokens=10,
        hot_running=2,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        num_blocks=64,
        skip_hf=True,
        lora_paths="epilogue,unfused",
    )
    row = lora.measure("tiny", args)
    assert row["shape"] == "tiny (RANDOM weights)"
    for key in ("base_tok_s", "lora_tok_s", "base_ms_tok", "lora_ms_tok", "merged_ms_tok", "hot_load_ms"):
        assert row[key] > 0, key
    assert row["lora_vs_base"] == pytest.approx(row["lora_tok_s"] / row["base_tok_s"])
    assert row["hot_read_ms"] > 0 and row["max_gap_steps"] > 0
    for key in (
        "unfused_lora_tok_s",
        "unfused_lora_ms_tok",
        "unfused_hot_load_ms",
    ):  # the second path's engine
        assert row[key] > 0, key
