"""PEFT LoRA adapters on disk: adapter_config.json + adapter_model.safetensors (or a weights-only .bin),
read and checked against a model's projections before any of it reaches a layer.

The web tier validates uploads with check_adapter (the model's targets come from the worker's heartbeat);
the engine reads the same files with read_adapter. One reader, so both refuse the same adapters.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from gpu_worker.errors import InvalidAdapterError
from gpu_worker.models.base import CausalLM
from gpu_worker.zips import directory_size, first_compressed

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# A LoRA holds two tensors a projection a layer, far fewer than this; each takes at most MAX_ENTRY_BYTES of a
# safetensors header or of a .bin's zip directory. Both are parsed into an object per entry, so they are
# bounded before parsing.
MAX_TENSORS = 16_384
MAX_ENTRY_BYTES = 512
# base_model.model.<module path>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that decide how the adapter applies."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str  # names matched as suffixes, or one regex (PEFT allows both)
    fan_in_fan_out: bool
    base_model_name_or_path: str | None

    @property
    def scaling(self) -> float:
        """Return the factor on B @ A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class AdapterInfo:
    """What the registry records about a checked adapter."""

    rank: int
    alpha: float
    target_modules: list[str]  # the model's target suffixes the weights fill, sorted
    size_bytes: int  # of the weights file
    sha256: str  # hex digest of the weights file's bytes


@dataclass(frozen=True)
class Adapter:
    """A checked adapter in memory: weights[(layer, target)] = (A [r, in], B [out, r]) as stored."""

    config: AdapterConfig
    info: AdapterInfo
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Return the LoRA settings of the adapter directory `path`; raise InvalidAdapterError if its
    adapter_config.json is missing, unparseable, not a LoRA, or uses a variant Ruvon does not apply."""
    file = Path(path) / CONFIG_FILE
    try:
        with open(file, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InvalidAdapterError(f"no {CONFIG_FILE} in the adapter directory") from None
    except OSError as exc:
        raise InvalidAdapterError(f"cannot read {CONFIG_FILE}: {exc.strerror or exc}") from None
    if len(text) > MAX_CONFIG_BYTES:  # parsed, JSON takes up to ~25x its size in memory
        raise InvalidAdapterError(f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes (PEFT writes ~1 KB)")
    try:
        raw = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8, an int of 4300+ digits
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object")
    if raw.get("peft_type") != "LORA":
        raise InvalidAdapterError(f"not a LoRA adapter (peft_type {raw.get('peft_type')!r}, expected 'LORA')")
    _refuse_variants(raw)
    return AdapterConfig(
        r=_positive_int(raw, "r"),
        lora_alpha=_number(raw, "lora_alpha"),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_target_modules(raw.get("target_modules")),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def adapter_targets(model: CausalLM) -> dict[str, tuple[int, int]]:
    """Return the PEFT target suffixes `model` takes adapters on, each with its (in_features, out_features).

    Every decoder layer has the same projections, so layer 0 speaks for all model.config.num_layers of them.
    """
    layer = getattr(model, model.layers_attr)[0]
    targets = {}
    for suffix, (module, shard) in model.LORA_TARGETS.items():
        projection = layer.get_submodule(module)
        out_features = projection.out_features
        if shard is not None:
            start, end = projection.shard_rows[shard]
            out_features = end - start
        targets[suffix] = (projection.in_features, out_features)
    return targets


def check_adapter(
    path: str | Path, targets: Mapping[str, Sequence[int]], num_layers: int, max_rank: int
) -> AdapterInfo:
    """Return what the registry records about the adapter at `path`, once every tensor fits the model whose
    `targets` (adapter_targets, or the heartbeat's copy) and `num_layers` are given; raise
    InvalidAdapterError naming the first problem."""
    return read_adapter(path, targets, num_layers, max_rank).info


def read_adapter(
    path: str | Path,
    targets: Mapping[str, Sequence[int]],
    num_layers: int,
    max_rank: int,
    expected_sha256: str | None = None,
) -> Adapter:
    """Return the adapter at `path` with its tensors, checked as check_adapter does; also refuse it when its
    weights file's sha256 is not `expected_sha256` (the file changed since the registry checked it)."""
    config = read_adapter_config(path)
    if config.r > max_rank:
        raise InvalidAdapterError(f"rank {config.r} is above this server's maximum LoRA rank {max_rank}")
    wanted = _match_targets(config.target_modules, targets)
    file, data = _read_weights_file(Path(path))
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise InvalidAdapterError(
            f"{file.name} changed on disk: sha256 {sha256[:12]}..., the registry has {expected_sha256[:12]}..."
        )
    tensors = _parse_weights(file, data)
    weights = _pair_tensors(tensors, targets, num_layers, config.r, wanted)
    info = AdapterInfo(
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=sorted({target for _, target in weights}),
        size_bytes=len(data),
        sha256=sha256,
    )
    return Adapter(config, info, weights)


def match_target(module_path: str, targets: Mapping[str, Sequence[int]]) -> str | None:
    """Return the longest target suffix that `module_path` ("attn.c_proj", "h.3.mlp.c_proj") ends with."""
    dotted = "." + module_path
    found = [suffix for suffix in targets if dotted.endswith("." + suffix)]
    return max(found, key=len) if found else None


# Config keys of LoRA variants whose forward is not W x + scaling * B A x (applied as plain LoRA they would
# be silently wrong), with what to tell the uploader.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained modules beside the LoRA (modules_to_save)",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "target_parameters": "LoRA on parameters rather than modules (target_parameters)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
}


def _refuse_variants(raw: dict[str, object]) -> None:
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise InvalidAdapterError(f"{what} is not supported")
    if raw.get("bias") not in (None, "none"):
        raise InvalidAdapterError(
            f"adapters that train the base biases (bias {raw.get('bias')!r}) are not supported"
        )


def _positive_int(raw: dict[str, object], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidAdapterError(f"{CONFIG_FILE}: {key} must be a positive integer, got {value!r}")
    return value


def _number(raw: dict[str, object], key: str) -> float:
    value = raw.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidAdapterError(f"{CONFIG_FILE}: {key} must be a number, got {value!r}")
    return float(value)


def _target_modules(value: object) -> list[str] | str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value)
    raise InvalidAdapterError(f"{CONFIG_FILE}: target_modules must be a list of module names, got {value!r}")


def _match_targets(target_modules: list[str] | str, targets: Mapping[str, Sequence[int]]) -> set[str]:
    """Return the model's target suffixes the config names; refuse a name that matches none of them."""
    if isinstance(target_modules, str):  # a regex over full module names: the weights say what it hit
        return set(targets)
    wanted = set()
    for name in target_modules:
        # "c_proj" names attn.c_proj and mlp.c_proj; "self_attn.q_proj" or "h.0.attn.c_attn" names one.
        hits = {s for s in targets if ("." + s).endswith("." + name) or ("." + name).endswith("." + s)}
        if not hits:
            raise InvalidAdapterError(
                f"target module {name!r} is not a projection of this model (it takes {', '.join(targets)})"
            )
        wanted |= hits
    return wanted


def _read_weights_file(path: Path) -> tuple[Path, bytes]:
    for name in WEIGHT_FILES:
        file = path / name
        if file.exists() and not file.is_dir():  # a file, or anything that reads like one (a pipe)
            try:
                return file, file.read_bytes()
            except OSError as exc:
                raise InvalidAdapterError(f"cannot read {name}: {exc.strerror or exc}") from None
    raise InvalidAdapterError(f"no weights file ({' or '.join(WEIGHT_FILES)}) in the adapter directory")


def _parse_weights(file: Path, data: bytes) -> dict[str, torch.Tensor]:
    """Return the tensors of a weights file's bytes; a .bin only through torch's weights-only unpickler."""
    if file.suffix == ".safetensors":
        header_bytes = int.from_bytes(data[:8], "little")
        if header_bytes > MAX_TENSORS * MAX_ENTRY_BYTES:
            limit = MAX_TENSORS * MAX_ENTRY_BYTES
            raise InvalidAdapterError(
                f"{file.name} has a {header_bytes}-byte header; a LoRA's needs at most {limit}"
            )
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError) as exc:
            raise InvalidAdapterError(f"{file.name} is not a valid safetensors file: {exc}") from None
        except KeyError as exc:  # a dtype safetensors knows and torch does not (F4, F8_E8M0)
            raise InvalidAdapterError(
                f"{file.name} holds a tensor of dtype {exc}, which torch cannot load"
            ) from None
    _check_torch_zip(file, data)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidAdapterError(
            f"{file.name} is refused by the weights-only loader (pickled code or objects?): {first_line}"
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise InvalidAdapterError(f"{file.name} must hold a flat dict of tensors")
    return loaded


def _check_torch_zip(file: Path, data: bytes) -> None:
    """Refuse a .bin that torch.load would spend unbounded memory or time on: one not in torch's zip format
    (its pickle, the whole file, would be unpickled first), a zip directory or pickle bigger than a LoRA's
    (the weights-only unpickler takes ~0.1 ms a tensor), or a compressed record (torch.load inflates each whole:
    a few KiB of deflated zeros would allocate GiBs; torch.save stores records uncompressed)."""
    if not data.startswith(b"PK\x03\x04"):
        raise InvalidAdapterError(
            f"{file.name} is not a torch zip file (torch.save since 1.6), the only kind the weights-only "
            "loader takes here; save it again, or as safetensors"
        )
    limit = MAX_TENSORS * MAX_ENTRY_BYTES
    # zipfile builds an object per entry: bound the directory first, from its end record alone.
    directory = directory_size(io.BytesIO(data))
    if directory is not None and (directory[0] > MAX_TENSORS or directory[1] > limit):
        raise InvalidAdapterError(f"{file.name} holds more records than a LoRA has (at most {MAX_TENSORS})")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InvalidAdapterError(f"{file.name} is not a readable torch zip file: {exc}") from None
    packed = first_compressed(members)
    if packed is not None:
        raise InvalidAdapterError(
            f"{file.name} holds compressed records ({packed}); torch.save writes them uncompressed"
        )
    pickles = [m for m in members if m.filename.endswith(".pkl") and m.file_size > limit]
    if pickles:
        raise InvalidAdapterError(
            f"{file.name} has a {pickles[0].file_size}-byte pickle; a LoRA's needs at most {limit}"
        )


def _pair_tensors(
    tensors: dict[str, torch.Tensor],
    targets: Mapping[str, Sequence[int]],
    num_layers: int,
    rank: int,
    wanted: set[str],
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Return (A, B) per (layer, target), each shape-checked; refuse a key that fits no projection."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise InvalidAdapterError(f"tensor {key!r} is not a LoRA A or B weight")
        layer, target = _locate(match["module"], key, targets, num_layers, wanted)
        in_features, out_features = targets[target]
        expected = (rank, in_features) if match["which"] == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise InvalidAdapterError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, this model needs {expected} "
                f"(rank {rank}, {target} is {in_features} -> {out_features})"
            )
        if not tensor.is_floating_point():
            raise InvalidAdapterError(f"tensor {key!r} is {tensor.dtype}, not floating point")
        halves.setdefault((layer, target), {})[match["which"]] = tensor
    if not halves:
        raise InvalidAdapterError("the weights file holds no LoRA tensors")
    for (layer, target), pair in halves.items():
        if len(pair) != 2:
            raise InvalidAdapterError(f"layer {layer} {target} has lora_{''.join(pair)} without its partner")
    return {place: (pair["A"], pair["B"]) for place, pair in sorted(halves.items())}


def _locate(
    module: str, key: str, targets: Mapping[str, Sequence[int]], num_layers: int, wanted: set[str]
) -> tuple[int, str]:
    """Return (layer index, target suffix) of a PEFT module path such as "transformer.h.3.attn.c_attn"."""
    parts = module.split(".")
    index = next((i for i, part in enumerate(parts) if part.isascii() and part.isdigit()), None)
    if index is None:
        raise InvalidAdapterError(
            f"tensor {key!r} is not inside a decoder layer (embeddings, heads: not supported)"
        )
    digits = parts[index]  # int() refuses 4300+ digits: no layer index is longer than ten
    layer = int(digits) if len(digits) <= 10 else num_layers
    if layer >= num_layers:
        raise InvalidAdapterError(f"tensor {key!r} is for layer {digits}; this model has {num_layers} layers")
    target = match_target(".".join(parts[index + 1 :]), targets)
    if target is None or target not in wanted:
        raise InvalidAdapterError(
            f"tensor {key!r} is for a module this model has no adapter place for (it takes {', '.join(targets)})"
        )
    return layer, target
