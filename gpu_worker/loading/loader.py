"""Turns a model spec (HF directory, HF cache name, GGUF file, `random:<shape>`) into a loaded Ruvon model.

Reading files is the job of gpu_worker/loading/checkpoints; this module picks the reader, and the model's
layers take the tensors one by one (CausalLM.load_weight).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from gpu_worker.config import ModelConfig
from gpu_worker.errors import InvalidAdapterError, ModelLoadError
from gpu_worker.loading.checkpoints import Checkpoint
from gpu_worker.loading.checkpoints.gguf_file import (
    FLOAT_TYPES,
    GGUF_QUANT_LAYOUTS,
    open_gguf,
    projection_types,
    read_gguf_config,
    read_gguf_tensors,
    token_embedding_type,
)
from gpu_worker.loading.checkpoints.hf_dir import read_hf_config, read_hf_tensors
from gpu_worker.loading.checkpoints.hub import pull
from gpu_worker.loading.specs import RANDOM_SHAPES, ModelSource, parse_random_spec, random_shape, resolve_spec
from gpu_worker.lora.format import adapter_targets, read_adapter
from gpu_worker.lora.merge import merge_adapter
from gpu_worker.models import CausalLM, build_model
from gpu_worker.quant import (
    AUTO,
    QuantLinear,
    QuantScheme,
    load_quantized_from,
    parse_scheme,
    quantize,
    quantize_embedding,
)
from gpu_worker.quant.gptq import Calibration, gptq_linears
from kernels.backend import backend_for

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "RANDOM_SHAPES",
    "LoadedModel",
    "auto_quantization",
    "ModelSource",
    "load_model",
    "pull",
    "random_hf_config",
    "requantize",
    "resolve_spec",
]

PROGRESS_MIN_BYTES = 256 * 2**20  # below this a progress bar is noise


@dataclass
class LoadedModel:
    """A model ready for the runner, plus where it came from and how to describe it to users."""

    model: CausalLM
    config: ModelConfig
    name: str  # the served model name
    label: str  # human description; says RANDOM for synthetic weights
    is_random: bool
    source_kind: Literal["hf_dir", "gguf", "random"]
    source_path: Path | None

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers as they sit on the device (a quantised layer's packed
        weights, scales and mins; the embedding and LM head in the model dtype)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quantization: str = "none",
    merge_lora: tuple[str, str] | None = None,
    quantize_embeddings: bool = False,
) -> LoadedModel:
    """Load what `spec` names: an HF directory or cache name, a .gguf file, `smollm2`, or `random:<shape>`;
    with the LoRA adapter `merge_lora` (name, directory) folded into its weights, and then its projections
    quantised by `quantization` (gpu_worker.quant.SCHEMES) unless "none"; "auto" keeps a GGUF's quantised
    projections as they are stored (auto_quantization). `quantize_embeddings`: the token table (and the LM
    head tied to it) in int8, one scale per row."""
    if quantization == AUTO:
        quantization = "none" if merge_lora is not None else auto_quantization(spec)
    scheme = parse_scheme(quantization)  # a bad name fails here, before anything is read
    embeddings = _check_embeddings(quantize_embeddings, scheme)
    if merge_lora is not None:
        full = load_model(spec, dtype=dtype, device=device, seed=seed)
        return requantize(_merged(full, *merge_lora), quantization, quantize_embeddings=embeddings)
    source = resolve_spec(spec)
    if source.kind == "random":
        loaded = _load_random(source.spec, dtype, device, seed, scheme, embeddings)
    elif source.kind == "gguf":
        assert source.path is not None
        loaded = _load_gguf(source.path, source.name, dtype, device, scheme, embeddings)
    else:
        assert source.path is not None
        loaded = _load_hf_dir(source.path, source.name, dtype, device, scheme, embeddings)
    return_freed_memory()
    return loaded


def _check_embeddings(quantize_embeddings: bool, scheme: QuantScheme | None) -> bool:
    """Return quantize_embeddings; raise ModelLoadError, before anything is read, where it cannot apply."""
    if quantize_embeddings and scheme is not None and scheme.library != "ruvon":
        raise ModelLoadError(
            f"--quantize-embeddings uses Ruvon's int8 kernels, not {scheme.describe()}: drop it, or pick "
            "--quantization int8 or int4-g<G>"
        )
    return quantize_embeddings


def return_freed_memory() -> None:
    """Hand the heap pages that loading freed (file buffers, full-precision copies) back to the OS: glibc
    keeps them otherwise, and the process's resident memory would count them for its whole life."""
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def auto_quantization(spec: str) -> str:
    """Return the scheme that runs `spec`'s weights as they are stored: int4-g32 for a GGUF whose
    projections are all Q4_0 / Q4_1, int8 for all Q8_0, else "none" (float files, mixed types, HF
    directories and random weights keep their dtype). Reads only the GGUF's header."""
    source = resolve_spec(spec)
    if source.kind != "gguf":
        return "none"
    assert source.path is not None
    return scheme_as_stored(projection_types(open_gguf(source.path)))


# (bits, block) of a GGUF quantised type -> the scheme that runs it as stored; None: a type with no layout
_AS_STORED: dict[tuple[int, int] | None, str] = {(4, 32): "int4-g32", (8, 32): "int8"}


def scheme_as_stored(types: dict[str, str]) -> str:
    """Return the scheme that takes every projection of these GGUF types as it is, else "none"."""
    layouts = {GGUF_QUANT_LAYOUTS.get(t) for t in types.values()}
    return _AS_STORED.get(layouts.pop(), "none") if len(layouts) == 1 else "none"


def _merged(loaded: LoadedModel, name: str, path: str) -> LoadedModel:
    """Return `loaded` with the adapter at `path` folded into its (full-precision) weights, labelled so."""
    model = loaded.model
    try:
        # No rank bound: a merged adapter takes no slot.
        adapter = read_adapter(path, adapter_targets(model), loaded.config.num_layers, max_rank=1 << 30)
    except InvalidAdapterError as exc:
        raise ModelLoadError(f"LoRA {name} ({path}): {exc.reason}") from None
    merge_adapter(model, adapter)
    rank, alpha = adapter.info.rank, adapter.info.alpha
    label = f"{loaded.label.removesuffix(')')}, LoRA {name} merged: rank {rank}, alpha {alpha:g})"
    return replace(loaded, label=label)


def _load_hf_dir(
    path: Path,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    scheme: QuantScheme | None,
    embeddings: bool,
) -> LoadedModel:
    config = read_hf_config(path)
    model, params = _empty_model(config, dtype, device, scheme, embeddings)
    _fill(model, read_hf_tensors(path), desc=name)
    label = f"{name} ({config.arch}, {params}{_quantized(scheme, embeddings, 'at load')}, from {path})"
    return LoadedModel(model, config, name, label, False, "hf_dir", path)


def _load_gguf(
    path: Path,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    scheme: QuantScheme | None,
    embeddings: bool,
) -> LoadedModel:
    reader = open_gguf(path)
    config = read_gguf_config(reader, path)
    keep, scheme = _gguf_plan(path, projection_types(reader), scheme)
    table = token_embedding_type(reader)
    if embeddings and table not in FLOAT_TYPES:
        raise ModelLoadError(
            f"{path.name}: its token embedding is {table}; int8 from it would round quantised weights again: "
            "drop --quantize-embeddings (the table loads dequantised)"
        )
    model, params = _empty_model(config, dtype, device, scheme, embeddings)
    _fill(model, read_gguf_tensors(reader, config, keep), desc=name)
    how = f"from {'/'.join(sorted(keep))} GGUF {path.name}" if keep else f"at load from GGUF {path.name}"
    label = f"{name} ({config.arch}, {params}, " + (
        f"{_describe(scheme, embeddings)} {how})"
        if scheme or embeddings
        else f"dequantised from {path.name})"
    )
    return LoadedModel(model, config, name, label, False, "gguf", path)


def _gguf_plan(
    path: Path, types: dict[str, str], scheme: QuantScheme | None
) -> tuple[frozenset[str], QuantScheme | None]:
    """Return the GGUF types to load as they are and the scheme that takes them (int8 from Q8_0 becomes
    int8 g32, Q8_0's block); raise ModelLoadError, naming the scheme that would, if a projection's type
    cannot map to `scheme` (requantising quantised weights would compound their error)."""
    if scheme is None:
        return frozenset(), None
    ours = scheme.library == "ruvon"  # bitsandbytes takes no GGUF layout as it is
    if ours and scheme.bits == 8 and "Q8_0" in types.values():
        scheme = QuantScheme(8, 32)
    direct = {
        t for t in types.values() if ours and GGUF_QUANT_LAYOUTS.get(t) == (scheme.bits, scheme.group_size)
    }
    stuck = sorted(set(types.values()) - direct - FLOAT_TYPES)
    if stuck:
        fits = {"Q8_0": "int8", "Q4_0": "int4-g32", "Q4_1": "int4-g32"}
        fixes = sorted({fits.get(t, "none") for t in stuck})
        example = next(name for name, t in types.items() if t == stuck[0])
        raise ModelLoadError(
            f"{path.name}: its projections are {', '.join(stuck)} (e.g. {example}), which "
            f"{scheme.describe()} cannot take as they are; use --quantization {' or '.join(fixes)}"
            + ("" if "none" in fixes else " (loads them as they are) or none (dequantises them)")
        )
    return frozenset(direct), scheme


def _describe(scheme: QuantScheme | None, embeddings: bool) -> str:
    """Return what is quantised, e.g. "int4 g128", "int4 g128 + int8 embedding", "int8 embedding"."""
    return " + ".join([*([scheme.describe()] if scheme else []), *(["int8 embedding"] if embeddings else [])])


def _quantized(scheme: QuantScheme | None, embeddings: bool, how: str) -> str:
    return f", {_describe(scheme, embeddings)} {how}" if scheme or embeddings else ""


def _load_random(
    spec: str,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    scheme: QuantScheme | None,
    embeddings: bool,
) -> LoadedModel:
    shape, seed = parse_random_spec(spec, seed)
    config = random_shape(shape)
    label = f"{shape} (RANDOM weights, seed {seed}{_quantized(scheme, embeddings, 'at load')})"
    # Quantised: the same random weights as unquantised, drawn on the CPU, then quantised into the device's layers.
    quantized = scheme is not None or embeddings
    model, _ = _empty_model(config, dtype, "cpu" if quantized else device, None)
    _fill_random(model, seed)
    if quantized:
        model = _quantized_copy(model, config, dtype, device, scheme, embeddings)
    return LoadedModel(model, config, f"random:{shape}", label, True, "random", None)


def requantize(
    loaded: LoadedModel,
    quantization: str,
    calibration: Calibration | None = None,
    *,
    quantize_embeddings: bool = False,
) -> LoadedModel:
    """Return `loaded` with its projections (and with `quantize_embeddings` its token table, in int8)
    quantised from its full-precision weights, labelled so; with `calibration`, int4 projections by GPTQ
    from the inputs they see on its text, else round-to-nearest.

    For comparisons such as int8 / int4 g128 from a GGUF's dequantised Q4_1 weights, which load_model
    refuses (quantising quantised weights again compounds their error: bench/quant_accuracy.py measures it).
    """
    scheme = parse_scheme(quantization)
    embeddings = _check_embeddings(quantize_embeddings, scheme)
    if scheme is None and not embeddings:
        return loaded
    if calibration is not None and (scheme is None or (scheme.library, scheme.bits) != ("ruvon", 4)):
        what = scheme.describe() if scheme else "an int8 embedding alone"
        raise ModelLoadError(f"GPTQ builds Ruvon's int4 layers, not {what}: use int4-g<G>")
    param = next(loaded.model.parameters())
    model = _quantized_copy(
        loaded.model, loaded.config, param.dtype, param.device, scheme, embeddings, calibration
    )
    how = f" by GPTQ on {calibration.label}" if calibration else ""
    label = f"{loaded.label.removesuffix(')')}, then {_describe(scheme, embeddings)}{how} from those weights)"
    return replace(loaded, model=model, label=label)


def _quantized_copy(
    full: CausalLM,
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    scheme: QuantScheme | None,
    embeddings: bool = False,
    calibration: Calibration | None = None,
) -> CausalLM:
    model, _ = _empty_model(config, dtype, device, scheme, embeddings)
    quantized = {}
    if calibration is not None:
        assert scheme is not None and scheme.group_size is not None  # int4 is always grouped
        names = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
        quantized = gptq_linears(full, names, scheme.group_size, calibration, dtype)
    with torch.no_grad():
        load_quantized_from(model, full, quantized)
    return model


def _fill_random(model: CausalLM, seed: int) -> None:
    # Drawn on the CPU in a fixed order, so one seed gives the same weights on every device and dtype.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                param.fill_(0.0 if name.endswith(".bias") else 1.0)  # biases 0, norm scales 1


def random_hf_config(shape: str) -> PretrainedConfig:
    """Return a transformers config of the same shape as random:<shape>, to build an HF peer model."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    c = random_shape(shape)
    tokens: dict[str, Any] = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids[0]}
    if c.arch == "gpt2":
        return GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.max_position_embeddings,
            n_embd=c.hidden_size,
            n_layer=c.num_layers,
            n_head=c.num_heads,
            n_inner=c.intermediate_size,
            layer_norm_epsilon=c.norm_eps,
            activation_function="gelu_new",
            **tokens,
        )
    config_class = Qwen2Config if c.arch == "qwen2" else LlamaConfig
    return config_class(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings,
        **tokens,
    )


def _empty_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    scheme: QuantScheme | None,
    embeddings: bool = False,
) -> tuple[CausalLM, str]:
    """Return the model, allocated but unfilled, with the kernel backend of its device, and its size.

    Built on the meta device (no time spent on an init the weights overwrite anyway) and quantised there,
    so the full-precision projections are never allocated.
    """
    with torch.device("meta"):
        model = build_model(config)
    params = _num_params(model)
    model.context.backend = backend_for(torch.device(device))  # quantised layers pack for it as they load
    if scheme is not None:
        quantize(model, scheme)
    if embeddings:
        quantize_embedding(model, model.token_embedding_attr, model.context)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.requires_grad_(False)
    return model.eval(), params


def _fill(model: CausalLM, checkpoint: Checkpoint, desc: str) -> None:
    """Hand every checkpoint tensor to the model's layers; fail if the checkpoint left a parameter unset."""
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # anything still NaN afterwards was missing from the checkpoint
    quiet = True if checkpoint.nbytes < PROGRESS_MIN_BYTES else None  # None: tqdm hides itself off a tty
    for name, tensor in tqdm(checkpoint.tensors, total=checkpoint.count or None, desc=desc, disable=quiet):
        try:
            model.load_weight(name, tensor)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{desc}: tensor {name} {exc}") from None
    unset = [name for name, param in model.named_parameters() if param.isnan().any()]
    if unset:
        raise ModelLoadError(
            f"{desc}: the checkpoint lacks (or has NaN in) {len(unset)} tensors, e.g. {unset[:5]}"
        )


def _num_params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params"
