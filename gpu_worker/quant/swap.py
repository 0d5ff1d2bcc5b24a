"""quantize(model, scheme): every projection becomes its quantised twin, checked before anything is swapped;
quantize_embedding(model): the token table becomes Int8Embedding (asked for apart: --quantize-embeddings)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import Embedding, QuantizedTensor
from gpu_worker.layers.context import ForwardContext
from gpu_worker.layers.linear import Linear
from gpu_worker.quant.embedding import Int8Embedding
from gpu_worker.quant.layers import Int4Linear, Int8Linear, QuantLinear
from gpu_worker.quant.schemes import INT4_GROUPS, QuantScheme

LM_HEAD = "lm_head"


def quantize(model: nn.Module, scheme: QuantScheme, *, lm_head: bool = False) -> list[str]:
    """Swap every Linear in `model` (the LM head only when `lm_head`) for the scheme's layer; return the
    names swapped. Raise ModelLoadError, before changing anything, if a layer cannot take the scheme.

    Meant for a model on the meta device, before its weights are allocated and loaded: the new layers
    quantise each tensor as it loads (QuantLinear.load_weight).
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Linear) and (lm_head or name.rpartition(".")[2] != LM_HEAD)
    ]
    _check(targets, scheme)
    cls = _layer_class(scheme)
    for name, linear in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, cls.from_linear(linear, scheme))
    return [name for name, _ in targets]


def quantize_embedding(model: nn.Module, name: str, context: ForwardContext) -> None:
    """Swap the token embedding `name` (and so a head tied to it) for an Int8Embedding reading `context`'s
    backend. Like quantize(), meant for a model on the meta device: the new table quantises as it loads."""
    embedding = model.get_submodule(name)
    if not isinstance(embedding, Embedding):
        raise ModelLoadError(f"{name} is a {type(embedding).__name__}, not a full-precision Embedding")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, Int8Embedding.from_embedding(embedding, context))


def load_quantized_from(
    model: nn.Module, full: nn.Module, quantized: Mapping[str, QuantizedTensor] | None = None
) -> None:
    """Fill a quantised `model` from `full`, the same model unquantised: its projections (and an int8 token
    table) quantised layer by layer (or taken from `quantized`, by name, where it has them: GPTQ's), every
    other parameter copied."""
    quantized = quantized or {}
    source = full.state_dict()
    for name, param in model.named_parameters():
        if name in source and source[name].shape == param.shape:
            param.data.copy_(source[name])
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            linear = full.get_submodule(name)
            assert isinstance(linear, Linear)
            module.load_linear(linear, quantized.get(name))
        elif isinstance(module, Int8Embedding):
            module.load_weight("weight", full.get_submodule(name).get_parameter("weight").detach())


def _layer_class(scheme: QuantScheme) -> type[QuantLinear]:
    if scheme.library == "bnb":
        from gpu_worker.quant.bnb import BnbInt8Linear, BnbNF4Linear  # bitsandbytes is optional

        return BnbInt8Linear if scheme.bits == 8 else BnbNF4Linear
    return Int8Linear if scheme.bits == 8 else Int4Linear


def _check(targets: list[tuple[str, Linear]], scheme: QuantScheme) -> None:
    if scheme.library != "ruvon":
        return  # bitsandbytes takes any shape
    group = scheme.group_size
    narrow = [
        f"{name} (in_features {m.in_features})" for name, m in targets if group and m.in_features < group
    ]
    if narrow:
        width = min(m.in_features for _, m in targets)
        fits = [f"int4-g{g}" for g in INT4_GROUPS if g <= width]
        raise ModelLoadError(
            f"{scheme.describe()}: group size {group} is wider than the input of {', '.join(narrow[:3])}; "
            f"use --quantization {' or '.join([*fits, 'int8'])}"
        )
    if scheme.bits == 4:
        multiple = targets[0][1].context.backend.int4_n_multiple if targets else 1
        odd = [f"{name} (out_features {m.out_features})" for name, m in targets if m.out_features % multiple]
        if odd:
            raise ModelLoadError(
                f"int4 on this device packs rows in blocks of {multiple}; {', '.join(odd[:3])} is not a "
                "multiple: use --quantization int8 here"
            )
