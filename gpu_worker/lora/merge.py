"""Merge at load: one adapter folded into the base weights, W += scaling * B @ A, so it costs nothing per
token; done on full-precision weights, before any quantisation (the loader quantises afterwards)."""

from __future__ import annotations

import torch

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.linear import WHOLE, Linear
from gpu_worker.lora.format import Adapter
from gpu_worker.models.base import CausalLM


def merge_adapter(model: CausalLM, adapter: Adapter) -> None:
    """Add the adapter's scaled update to the weight rows of every projection (shard) it targets."""
    layers = getattr(model, model.layers_attr)
    scaling = adapter.config.scaling
    with torch.no_grad():
        for (index, target), (lora_a, lora_b) in adapter.weights.items():
            module, shard = model.LORA_TARGETS[target]
            projection = layers[index].get_submodule(module)
            if not isinstance(projection, Linear):
                raise ModelLoadError(
                    f"cannot merge a LoRA into {type(projection).__name__}: merge, then quantise"
                )
            start, end = projection.shard_rows[shard or WHOLE]
            weight = projection.weight.data  # [out, in]
            delta = scaling * (lora_b.float() @ lora_a.float())  # [rows, r] @ [r, in] -> [rows, in]
            weight[start:end] += delta.to(weight.device, weight.dtype)
