"""Time putting one LoRA adapter into a device slot (AdapterManager._place), the step a hot load adds.

RANDOM weights of the given GPT-2 shape and a random rank-16 adapter of it (bench/lora.py --write-adapter);
each placing goes into a free slot, as a hot load's first does, and on CUDA is timed to the end of its
copies. Prints the median, min and max over --repeat placings.

    python bench/lora_place.py --shape gpt2-xl --dtype float16 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lora import write_adapter  # noqa: E402
from gpu_worker.loading.loader import load_model, random_hf_config  # noqa: E402
from gpu_worker.loading.specs import RANDOM_SHAPES  # noqa: E402
from gpu_worker.lora.format import read_adapter  # noqa: E402
from gpu_worker.lora.manager import AdapterManager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    gpt2_shapes = [name for name, config in RANDOM_SHAPES.items() if config.arch == "gpt2"]
    parser.add_argument("--shape", default="gpt2-xl", choices=gpt2_shapes)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_model(f"random:{args.shape}", dtype=getattr(torch, args.dtype), device=device).model
    manager = AdapterManager(model, max_loras=args.slots, max_rank=16, max_cpu_loras=args.slots)
    with tempfile.TemporaryDirectory() as folder:
        config: transformers.PretrainedConfig = random_hf_config(args.shape)
        write_adapter(Path(folder), config, 16, ["c_attn", "c_proj", "c_fc"], seed=0)
        adapter = read_adapter(Path(folder), manager.targets, manager.num_layers, manager.max_rank)
    packed = manager._pack(("bench", "random"), adapter, 0.0)
    manager.host[packed.key] = packed
    times = []
    for _ in range(args.repeat):
        for slot in range(args.slots):  # every slot free again, so each placing is a first one
            manager.slots[slot] = None
        manager.slot_of.clear()
        started = time.perf_counter()
        manager._place(packed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    print(
        f"{args.shape} {args.dtype} on {device}, {len(manager.modules)} projections with LoRA slots: placing one "
        f"rank-16 adapter {statistics.median(times):.2f} ms median, {min(times):.2f} min, {max(times):.2f} max "
        f"over {args.repeat}"
    )


if __name__ == "__main__":
    main()
