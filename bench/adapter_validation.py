"""What validating an upload costs the registry (docs/parts/18-lora.md): the safe unzip, then check_adapter
(read, sha256, parse, shape checks), for PEFT adapters of the shapes people upload: SmolLM2-135M q/k/v/o
rank 8 (the demo adapter's shape), GPT-2 124M and XL on all four projections at ranks 8 and 16. Random fp32
tensors, zipped with deflate as `zip -r` would. Prints a table, writes bench/results/adapter_validation.json.

Run: .venv/bin/python bench/adapter_validation.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from gpu_worker.lora.format import check_adapter  # noqa: E402
from inference.adapters.archive import extract_adapter  # noqa: E402

# (name, layers, {target: (in, out, PEFT module path inside a layer)}, key prefix of a layer)
GPT2_PREFIX = "base_model.model.transformer.h.{}."
LLAMA_PREFIX = "base_model.model.model.layers.{}."


def gpt2(hidden: int) -> dict[str, tuple[int, int, str]]:
    return {
        "c_attn": (hidden, 3 * hidden, "attn.c_attn"),
        "attn.c_proj": (hidden, hidden, "attn.c_proj"),
        "c_fc": (hidden, 4 * hidden, "mlp.c_fc"),
        "mlp.c_proj": (4 * hidden, hidden, "mlp.c_proj"),
    }


SMOLLM2 = {name: (576, out, f"self_attn.{name}") for name, out in
           (("q_proj", 576), ("k_proj", 192), ("v_proj", 192), ("o_proj", 576))}  # fmt: skip
CASES = [
    ("smollm2-135m q/k/v/o", 30, SMOLLM2, LLAMA_PREFIX, 8),
    ("gpt2-124m all four", 12, gpt2(768), GPT2_PREFIX, 8),
    ("gpt2-124m all four", 12, gpt2(768), GPT2_PREFIX, 16),
    ("gpt2-xl all four", 48, gpt2(1600), GPT2_PREFIX, 8),
    ("gpt2-xl all four", 48, gpt2(1600), GPT2_PREFIX, 16),
]


def adapter_zip(layers: int, targets: dict[str, tuple[int, int, str]], prefix: str, rank: int) -> bytes:
    """Return a zipped PEFT folder with random A [rank, in] and B [out, rank] on every target of every layer."""
    tensors = {}
    for layer in range(layers):
        for in_features, out_features, module in targets.values():
            key = prefix.format(layer) + module
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank)
    names = [module.rsplit(".", 1)[-1] for *_, module in targets.values()]
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": names, "bias": "none"}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter/adapter_config.json", json.dumps(config))
        zf.writestr("adapter/adapter_model.safetensors", save(tensors))
    return out.getvalue()


def measure(case: tuple, repeat: int) -> dict[str, object]:
    name, layers, targets, prefix, rank = case
    data = adapter_zip(layers, targets, prefix, rank)
    shapes = {target: (i, o) for target, (i, o, _) in targets.items()}
    best_extract = best_check = float("inf")
    for _ in range(repeat):
        root = Path(tempfile.mkdtemp(prefix="ruvon-bench-"))
        start = time.perf_counter()
        extract_adapter(io.BytesIO(data), root / "a", max_bytes=256 * 2**20, max_files=32)
        extracted = time.perf_counter()
        info = check_adapter(root / "a", shapes, layers, max_rank=64)
        checked = time.perf_counter()
        shutil.rmtree(root)
        best_extract = min(best_extract, extracted - start)
        best_check = min(best_check, checked - extracted)
    return {
        "adapter": name,
        "rank": rank,
        "tensors": 2 * layers * len(targets),
        "weights_mb": info.size_bytes / 2**20,
        "zip_mb": len(data) / 2**20,
        "unzip_ms": best_extract * 1000,
        "check_ms": best_check * 1000,
        "total_ms": (best_extract + best_check) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per adapter")
    args = parser.parse_args()
    rows = [measure(case, args.repeat) for case in CASES]
    print_table(rows)
    print(write_json("adapter_validation", {"repeat": args.repeat, "rows": rows}))


if __name__ == "__main__":
    main()
