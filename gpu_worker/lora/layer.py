"""LoRALinear(base): any projection (full precision, merged, quantised) plus the low-rank updates of up to
`max_loras` adapters held in stacked device slots; enable_lora(model, ...) swaps it in, as quantize() does."""

from __future__ import annotations

import torch

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, Layer
from gpu_worker.layers.linear import WHOLE, Linear
from gpu_worker.models.base import CausalLM
from gpu_worker.quant.layers import QuantLinear
from kernels.reference import LoRAStack

Projection = Linear | QuantLinear
# (layer index, PEFT target suffix) -> the LoRALinear it lands in and the shard of it that it fills.
Places = dict[tuple[int, str], tuple["LoRALinear", str]]


class LoRALinear(Layer):
    """base(x) + scales[s] * (x A[s]^T) B[s]^T on the rows whose segment uses slot s; slot -1 rows get base(x).

    a [max_loras, R, in], b [max_loras, out, R], ranks [max_loras] int32, scales [max_loras] float32, with
    R = (shards) x max_rank. A fused projection stacks its shards' A along R and puts each shard's B in its
    own rows and its own R columns, zero elsewhere: one shrink and one expand serve every shard.

    Steps of up to the backend's lora_fold_rows rows run base and update in the base's own kernel
    (lora_linear) where the backend can read the base's weight; the rest run the base, then lora_apply.
    """

    a: torch.Tensor
    b: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

    def __init__(self, base: Projection, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ModelLoadError("this projection serves LoRA adapters already")
        self.base = base
        self.context = base.context
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shard_rows = dict(base.shard_rows)
        self.max_rank = max_rank  # of one shard
        width = len(self.shard_rows) * max_rank
        device = _device_of(base)
        self.register_buffer("a", torch.zeros(max_loras, width, self.in_features, dtype=dtype, device=device))
        self.register_buffer(
            "b", torch.zeros(max_loras, self.out_features, width, dtype=dtype, device=device)
        )
        self.register_buffer("ranks", torch.zeros(max_loras, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(max_loras, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, in] -> [T, out]
        metadata = self.context.metadata
        lora = metadata.lora if metadata is not None else None
        if lora is None:  # no row of this step uses an adapter
            return self.base(x)
        backend = self.context.backend
        stack = LoRAStack(self.a, self.b, lora.seg_indptr, lora.seg_slots, self.ranks, self.scales)
        stored = self.base.stored_weight()
        if x.shape[0] <= backend.lora_fold_rows and stored is not None:
            return backend.lora_linear(x, stored, self.base.bias, self.base.gelu, stack)
        # The update joins the projection before its activation (PEFT adds it to the Linear's output), so
        # the activation moves from the base's epilogue to the update's.
        y = self.base.project(x, gelu=False)
        return backend.lora_apply(y, x, self.a, self.b, *stack.tables(), self.base.gelu)

    def warm_up(self, max_rows: int, max_segments: int) -> int:
        """Run the backend's LoRA kernels once in every launch variant a step of up to `max_rows` rows in
        `max_segments` segments can take, so none compiles mid-step; return how many ran."""
        backend = self.context.backend
        stacks = (self.a, self.b, self.ranks, self.scales)
        runs = backend.lora_warm_up(*stacks, max_rows, max_segments, gelu=self.base.gelu)
        stored = self.base.stored_weight()
        if stored is None:
            return runs
        # lora_linear compiles a variant per row count (its row loop is unrolled; one row is specialised):
        # each once, one segment a row (the segment count is not specialised on).
        rows = min(backend.lora_fold_rows, max_rows)
        x = torch.zeros(rows, self.in_features, dtype=self.a.dtype, device=self.a.device)
        for t in range(1, rows + 1):
            seg_indptr = torch.arange(t + 1, dtype=torch.int32, device=x.device)
            seg_slots = torch.arange(t, dtype=torch.int32, device=x.device) % self.a.shape[0]
            stack = LoRAStack(self.a, self.b, seg_indptr, seg_slots, self.ranks, self.scales)
            backend.lora_linear(x[:t], stored, self.base.bias, self.base.gelu, stack)
        return runs + rows

    def variant(self) -> tuple[object, ...]:
        """Return what sets this layer's kernel variants: its shapes, dtype, activation, and its base's
        bias and stored weight (lora_linear's launches read them)."""
        stored = self.base.stored_weight()
        weight = None
        if stored is not None:
            scales = None if stored.scales is None else (tuple(stored.scales.shape), stored.scales.dtype)
            weight = (stored.format, tuple(stored.weight.shape), stored.weight.dtype, scales)
        shapes = (self.in_features, self.out_features, tuple(self.a.shape), self.a.dtype, self.base.gelu)
        return (*shapes, self.base.bias is not None, weight)

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        self.base.load_weight(name, tensor)

    def pack(
        self, pieces: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return one adapter's (a [R, in], b [out, R], rank used) in this layer's slot layout from its
        (A [r, in], B [rows, r]) per shard; columns past the rank used stay zero."""
        width = self.a.shape[1]
        a = torch.zeros(width, self.in_features, dtype=dtype)
        b = torch.zeros(self.out_features, width, dtype=dtype)
        used = 0
        for shard, (start, end) in self.shard_rows.items():
            if shard not in pieces:
                continue
            lora_a, lora_b = pieces[shard]
            r = lora_a.shape[0]
            a[used : used + r] = lora_a
            b[start:end, used : used + r] = lora_b
            used += r
        return a, b, used

    def share_slots(
        self, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor
    ) -> None:
        """Hold the slots in the given views (of the AdapterManager's one slot table) instead of own tensors;
        the contents carry over. a and b may be strided along the slot dimension (the kernels read the
        strides); ranks and scales must be contiguous, as the kernels index them by slot."""
        if not (ranks.is_contiguous() and scales.is_contiguous()):
            raise ValueError("ranks and scales must be contiguous over the slots")
        for name, view in (("a", a), ("b", b), ("ranks", ranks), ("scales", scales)):
            mine = getattr(self, name)
            if view.shape != mine.shape or view.dtype != mine.dtype or view.device != mine.device:
                raise ValueError(f"{name}: {tuple(view.shape)} {view.dtype} does not fit {tuple(mine.shape)}")
            view.copy_(mine)
            setattr(self, name, view)  # a registered buffer: the view takes its place

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, rank: int, scale: float) -> None:
        """Copy one packed adapter into `slot` of this projection alone (a layer built without an
        AdapterManager; the manager places every projection at once through its SlotTable)."""
        self.a[slot].copy_(a, non_blocking=True)
        self.b[slot].copy_(b, non_blocking=True)
        self.ranks[slot] = rank
        self.scales[slot] = scale

    def extra_repr(self) -> str:
        return (
            f"slots={self.a.shape[0]}, max_rank={self.max_rank}, shards={list(self.shard_rows) or ['whole']}"
        )


def _device_of(module: torch.nn.Module) -> torch.device:
    # A quantised projection may hold its weight as a buffer (Int8Linear.qweight).
    return next(iter([*module.parameters(), *module.buffers()])).device


def enable_lora(model: CausalLM, max_loras: int, max_rank: int) -> Places:
    """Swap every adapter target of every decoder layer (model.LORA_TARGETS) for a LoRALinear with
    `max_loras` empty slots of rank up to `max_rank`; return where each (layer, target) landed."""
    if max_loras < 1 or max_rank < 1:
        raise ModelLoadError("max_loras and max_lora_rank must be at least 1")
    dtype = next(model.parameters()).dtype  # the embedding's: the model's activations
    shards_of: dict[str, int] = {}
    for module, _ in model.LORA_TARGETS.values():
        shards_of[module] = shards_of.get(module, 0) + 1
    places: Places = {}
    for index, layer in enumerate(getattr(model, model.layers_attr)):
        wrapped: dict[str, LoRALinear] = {}
        for module, shards in shards_of.items():
            base = layer.get_submodule(module)
            if not isinstance(base, Linear | QuantLinear) or len(base.shard_rows) != shards:
                raise ModelLoadError(f"layer {index} {module} is not a projection LoRA can wrap")
            wrapped[module] = LoRALinear(base, max_loras, max_rank, dtype)
            parent, _, leaf = module.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, wrapped[module])
        for target, (module, shard) in model.LORA_TARGETS.items():
            places[(index, target)] = (wrapped[module], shard or WHOLE)
    return places
