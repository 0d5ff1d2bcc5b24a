"""Self-draft for a model with no smaller sibling (`--speculative self[:int4|:layers=N]`): the target drafts
for itself from its int4 copy or from its first N layers, each run by DraftModelProposer with its own KV."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from gpu_worker.loading.loader import LoadedModel, requantize
from gpu_worker.models.base import CausalLM
from gpu_worker.quant.embedding import Int8Embedding
from gpu_worker.quant.layers import QuantLinear

# A GGUF's Q4_0 / Q4_1 weights are int4 in groups of 32, so requantising their dequantised values in g32
# finds the same groups again (checked for SmolLM2's Q4_1: tests/gpu_worker/spec/test_self_draft.py).
INT4_SCHEME = "int4-g32"
# Chosen by measured acceptance on SmolLM2-135M (docs/parts/16-speculative-decoding.md, "Self-draft").
DEFAULT_VARIANT = "int4"


def self_draft(loaded: LoadedModel, variant: str) -> LoadedModel:
    """Return the draft model `variant` ("", "int4" or "layers=N") of the loaded target; raise ValueError
    for a variant the target cannot take."""
    variant = variant or DEFAULT_VARIANT
    if variant == "int4":
        return int4_copy(loaded)
    count = variant.removeprefix("layers=")
    if variant.startswith("layers=") and count.isdigit():
        return early_exit(loaded, int(count))
    raise ValueError(f"speculative self: takes int4 or layers=N, not {variant!r}")


def int4_copy(loaded: LoadedModel) -> LoadedModel:
    """Return the target with its projections quantised to int4 g32 from its own weights (a new model)."""
    if any(isinstance(m, QuantLinear | Int8Embedding) for m in loaded.model.modules()):
        raise ValueError(
            "speculative self:int4 needs an unquantised target, and this one is quantised already (a GGUF's "
            "Q4 weights run as int4 by default): add --quantization none (and no --quantize-embeddings), or "
            "use self:layers=N or ngram"
        )
    draft = requantize(loaded, INT4_SCHEME)
    return replace(draft, name=f"{loaded.name} (self-draft int4)")


def early_exit(loaded: LoadedModel, num_layers: int) -> LoadedModel:
    """Return a model made of the target's first `num_layers` layers, its final norm and its LM head. Weights
    are the target's own tensors (nothing is copied); the modules, and so the KV cache views, are new."""
    total = loaded.config.num_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"speculative self:layers=N needs 1 <= N < {total} (the target's layers)")
    target = loaded.model
    draft = copy.deepcopy(target, memo=_shared_tensors(target))
    layers = getattr(draft, draft.layers_attr)
    setattr(draft, draft.layers_attr, nn.ModuleList(list(layers)[:num_layers]))
    draft.config = replace(loaded.config, num_layers=num_layers)
    label = f"{loaded.label} (self-draft: first {num_layers} of {total} layers, final norm, LM head)"
    return replace(
        loaded, model=draft, config=draft.config, name=f"{loaded.name} (layers<{num_layers})", label=label
    )


def _shared_tensors(model: CausalLM) -> dict[int, object]:
    """Return a deepcopy memo that maps every tensor the model holds, and its kernel backend, to itself."""
    memo: dict[int, object] = {id(model.context.backend): model.context.backend}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                memo[id(tensor)] = tensor
    return memo
