"""Plain-torch reference kernels (paged KV cache, add + norm); the CPU engine runs these; Triton matches them.

Cache layout, per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset; slot -1 means "do not store".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def store_kv_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, Bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, Bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Write each new token's key and value into its cache slot (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = k_cache.view(-1, k_cache.shape[-2], k_cache.shape[-1])
    v_flat = v_cache.view(-1, v_cache.shape[-2], v_cache.shape[-1])
    k_flat.index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value[keep].to(v_cache.dtype))


def paged_attention_ref(
    query: torch.Tensor,  # [T, H, D], the new tokens of all sequences, flat
    k_cache: torch.Tensor,  # [N, Bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, Bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32: KV length of each sequence, new tokens included
    query_start_loc: torch.Tensor,  # [B+1] int32: cumulative query lengths
    max_query_len: int,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new tokens over its paged context (the last `sliding_window`
    keys of each query's position, itself included, when that is not 0).

    Works for any mix of prefill chunks and single-token decodes: query token i of a sequence
    with q_len new tokens and context length L sits at position L - q_len + i and sees keys 0..that.
    """
    window = sliding_window or 1 << 62
    num_seqs = block_tables.shape[0]
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    num_heads = query.shape[1]
    device = query.device
    ctx = context_lens.long()  # [B]

    # Gather every sequence's keys/values through its block table: [B, L, Hkv, D]. (index_select on the
    # flat slot list, not advanced indexing: the same gather, several times faster on CPU.)
    offsets = torch.arange(block_size, device=device)
    slots = (block_tables.long().clamp(min=0)[:, :, None] * block_size + offsets).view(num_seqs, -1)
    max_len = slots.shape[1]
    keys = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots.view(-1))
    values = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots.view(-1))
    keys = keys.view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2).to(query.dtype)
    values = values.view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2).to(query.dtype)
    k_pos = torch.arange(max_len, device=device)

    if max_query_len == 1 and query.shape[0] == num_seqs:
        # Every sequence decodes one token at position ctx - 1: it sees keys 0..ctx-1.
        mask = (k_pos[None, :] < ctx[:, None]) & (k_pos[None, :] >= ctx[:, None] - window)  # [B, L]
        out = F.scaled_dot_product_attention(
            query[:, :, None, :],  # [B, H, 1, D]
            keys,  # [B, Hkv, L, D]
            values,
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        return out[:, :, 0, :]  # [B, H, D]

    # Scatter the flat queries into a padded [B, Q, H, D] batch.
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()  # [B]
    q_idx = torch.arange(max_query_len, device=device)
    valid_q = q_idx[None, :] < q_lens[:, None]  # [B, Q]
    flat_index = (query_start_loc[:-1].long()[:, None] + q_idx[None, :]).clamp(max=query.shape[0] - 1)
    padded_q = query[flat_index]  # [B, Q, H, D]

    # Key j is visible to query i when j <= its position, j < context length and j is inside its window.
    q_pos = ctx[:, None] - q_lens[:, None] + q_idx[None, :]  # [B, Q]
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ctx[:, None, None])
    mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    mask = mask | ~valid_q[:, :, None]  # padding rows attend to everything: finite, then dropped
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),  # [B, H, Q, D]
        keys,  # [B, Hkv, L, D]
        values,
        attn_mask=mask[:, None, :, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [B, Q, H, D]
    return out[valid_q]


FP, INT8, INT8_GROUPED, INT4 = 0, 1, 2, 3  # the formats a projection's weight is stored in


@dataclass(frozen=True)
class StoredWeight:
    """A projection's weight as it is stored: FP [N, K] (scales None); INT8 / INT8_GROUPED [N, K] int8 with
    scales [N, 1] / [N, K // G] (int8_linear_ref); INT4 packed [N, K_pad // 2] with qscales [N, K_pad // G, 2]
    (int4_linear_ref)."""

    weight: torch.Tensor
    scales: torch.Tensor | None
    format: int


def stored_linear_ref(
    x: torch.Tensor, stored: StoredWeight, bias: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    """Return x @ W.T + bias ([T, N]), then tanh-GELU when gelu, W read in its stored format."""
    if stored.format == FP:
        return linear_ref(x, stored.weight, bias, gelu)
    assert stored.scales is not None
    linear = int4_linear_ref if stored.format == INT4 else int8_linear_ref
    return linear(x, stored.weight, stored.scales, bias, gelu)


def linear_ref(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    gelu: bool = False,
) -> torch.Tensor:
    """Return x @ weight.T + bias ([T, N]), then tanh-GELU when gelu."""
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if gelu else out


def add_layer_norm_ref(
    x: torch.Tensor,  # [T, C]
    residual: torch.Tensor | None,  # [T, C], or None for the first norm
    weight: torch.Tensor,  # [C]
    bias: torch.Tensor,  # [C]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + residual, LayerNorm of it); the new residual is x itself when residual is None."""
    if residual is not None:
        x = x + residual
    return x, F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_rms_norm_ref(
    x: torch.Tensor,  # [T, C]
    residual: torch.Tensor | None,  # [T, C], or None for the first norm
    weight: torch.Tensor,  # [C]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + residual, RMSNorm of it); the new residual is x itself when residual is None."""
    if residual is not None:
        x = x + residual
    # Normalise in float32 (half-precision squares overflow), scale in the model's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * x32.to(x.dtype)


# Weight-only quantised linears (W8A16, W4A16). Layouts, shared by these references and the Triton kernels:
#   int8: qweight int8 [N, K]; scales [N, K // G] (G = K: one scale per output channel); w = q * scale.
#   int4: qweight uint8 [N, K // 2], byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high);
#         qscales [N, K // G, 2] = (scale, min) per group of G along K; w = q * scale + min, q in 0..15.
_DEQUANT_ROWS = 1024  # rows dequantised at a time: a layer's full-precision copy never exists whole


def pack_int4_ref(
    q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (qweight, qscales) in the references' int4 layout from values q [N, K] (0..15) and [N, K // G]
    scales and mins."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4), torch.stack([scales, mins], dim=-1)


def unpack_int4_ref(qweight: torch.Tensor) -> torch.Tensor:
    """Return the values [N, K] (uint8, 0..15) of a reference-layout int4 qweight [N, K // 2]."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).flatten(1)


def add_bias_gelu(out: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """Return out + bias (when given), then tanh-GELU when gelu: the epilogue of every linear here."""
    if bias is not None:
        out = out + bias
    return F.gelu(out, approximate="tanh") if gelu else out


def _chunked_linear(
    x: torch.Tensor,
    rows: int,
    dequant: Callable[[int, int], torch.Tensor],
    bias: torch.Tensor | None,
    gelu: bool,
) -> torch.Tensor:
    # Output columns in blocks of _DEQUANT_ROWS weight rows, each dequantised just before its matmul.
    out = torch.cat(
        [
            F.linear(x, dequant(r, min(r + _DEQUANT_ROWS, rows)).to(x.dtype))
            for r in range(0, rows, _DEQUANT_ROWS)
        ],
        dim=-1,
    )
    return add_bias_gelu(out, bias, gelu)


def int8_linear_ref(
    x: torch.Tensor,  # [T, K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N, K // G]
    bias: torch.Tensor | None = None,  # [N]
    gelu: bool = False,
) -> torch.Tensor:
    """Return x @ (qweight * scales).T + bias ([T, N]), then tanh-GELU when gelu."""
    n, k = qweight.shape
    group = k // scales.shape[1]

    def dequant(start: int, end: int) -> torch.Tensor:
        q = qweight[start:end].float().view(end - start, -1, group)
        return (q * scales[start:end, :, None].float()).view(end - start, k)

    return _chunked_linear(x, n, dequant, bias, gelu)


def int4_linear_ref(
    x: torch.Tensor,  # [T, K]
    qweight: torch.Tensor,  # [N, K' // 2] uint8, the layout above (K' >= K: K padded to whole groups)
    qscales: torch.Tensor,  # [N, K' // G, 2]: (scale, min)
    bias: torch.Tensor | None = None,  # [N]
    gelu: bool = False,
) -> torch.Tensor:
    """Return x @ W.T + bias ([T, N]) with W = q * scale + min per group, then tanh-GELU when gelu; a weight
    padded along K to whole groups contributes only its first x.shape[1] columns."""
    n, k_pad = qweight.shape[0], qweight.shape[1] * 2
    group = k_pad // qscales.shape[1]

    def dequant(start: int, end: int) -> torch.Tensor:
        q = unpack_int4_ref(qweight[start:end]).float().view(end - start, -1, group)
        s = qscales[start:end].float()
        return (q * s[:, :, 0:1] + s[:, :, 1:2]).view(end - start, k_pad)[:, : x.shape[-1]]

    return _chunked_linear(x, n, dequant, bias, gelu)


# ---------------------------------------------------------------------------------------------- LoRA
# Many adapters in one batch: the rows of a step come in segments (one sequence's rows are consecutive);
# segment g is rows seg_indptr[g]:seg_indptr[g + 1] and uses adapter slot seg_slots[g] (-1: no adapter).
# Slots are stacked and padded to the widest rank R; ranks[s] is slot s's own rank (columns past it are
# zero and may be skipped). y += scales[s] * (x @ A[s]^T) @ B[s]^T is done in two steps: shrink, expand.


@dataclass(frozen=True)
class LoRAStack:
    """One LoRA projection's adapters for one step: its stacked slots and the step's segment tables."""

    a: torch.Tensor  # [S, R, K]
    b: torch.Tensor  # [S, N, R]
    seg_indptr: torch.Tensor  # [G + 1] int32
    seg_slots: torch.Tensor  # [G] int32
    ranks: torch.Tensor  # [S] int32
    scales: torch.Tensor  # [S] float32

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (seg_indptr, seg_slots, ranks, scales), in the order the LoRA kernels take them."""
        return self.seg_indptr, self.seg_slots, self.ranks, self.scales


def _segments(seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """Return (start, end, slot) for every segment that has an adapter."""
    bounds, slots = seg_indptr.tolist(), seg_slots.tolist()
    return [
        (bounds[g], bounds[g + 1], s) for g, s in enumerate(slots) if s >= 0 and bounds[g + 1] > bounds[g]
    ]


def lora_shrink_ref(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [S, R, K]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
) -> torch.Tensor:
    """Return h [T, R] float32: each row times its segment's A^T; zero for rows without an adapter and for
    columns past the slot's rank."""
    h = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    rank_of = ranks.tolist()
    for start, end, slot in _segments(seg_indptr, seg_slots):
        r = rank_of[slot]
        h[start:end, :r] = x[start:end].float() @ a[slot, :r].float().T
    return h


def lora_expand_ref(
    y: torch.Tensor,  # [T, N], updated in place
    h: torch.Tensor,  # [T, R] float32, from lora_shrink
    b: torch.Tensor,  # [S, N, R]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
) -> None:
    """y[rows] += scales[slot] * h[rows, :rank] @ B[slot, :, :rank]^T, in float32, stored in y's dtype; rows
    without an adapter are left as they are."""
    rank_of, scale_of = ranks.tolist(), scales.tolist()
    for start, end, slot in _segments(seg_indptr, seg_slots):
        r = rank_of[slot]
        delta = h[start:end, :r] @ b[slot, :, :r].float().T
        y[start:end] = (y[start:end].float() + scale_of[slot] * delta).to(y.dtype)


def lora_apply_ref(
    y: torch.Tensor,  # [T, N], updated in place: the base projection's output (bias in, no activation yet)
    x: torch.Tensor,  # [T, K] the projection's input
    a: torch.Tensor,  # [S, R, K]
    b: torch.Tensor,  # [S, N, R]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    gelu: bool = False,
) -> torch.Tensor:  # [T, N]
    """Return a LoRA projection's output: y (updated in place) plus each row's low-rank update (shrink, then
    expand), then tanh-GELU of every row when gelu (PEFT adds the update before the activation)."""
    lora_expand_ref(
        y, lora_shrink_ref(x, a, seg_indptr, seg_slots, ranks), b, seg_indptr, seg_slots, ranks, scales
    )
    return add_bias_gelu(y, None, gelu)


def lora_linear_ref(
    x: torch.Tensor,  # [T, K]
    stored: StoredWeight,  # [N, K] in its stored format
    bias: torch.Tensor | None,  # [N]
    gelu: bool,
    lora: LoRAStack,
) -> torch.Tensor:  # [T, N]
    """Return a LoRA projection's output from its base weight: x @ W.T + bias plus each row's low-rank
    update, then tanh-GELU when gelu (the base projection, then lora_apply_ref)."""
    y = stored_linear_ref(x, stored, bias)
    return lora_apply_ref(y, x, lora.a, lora.b, *lora.tables(), gelu)
