"""weight_mm with LoRA operands: the base projection and each row's low-rank update in one launch (plus
the split-K reduce), for fp, int8 and int4 weights, against lora_linear_ref; under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import (
    FP,
    INT4,
    INT8,
    INT8_GROUPED,
    LoRAStack,
    StoredWeight,
    lora_linear_ref,
    pack_int4_ref,
)

pytest.importorskip("triton")
from kernels.quant_linear import LORA_MAX_ROWS, GemmConfig, lora_linear, weight_mm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = (3, 8, 5)  # three slots in a stack R = 8 wide: two of them use less than its width
# (rows per segment, slot per segment): rows on different slots, a row on slot -1, an empty segment, and
# (the last) a segment of two rows, as a short prefill beside decodes has.
LAYOUTS = {
    "one-row": ([1], [1]),
    "decode": ([1, 1, 1], [2, -1, 0]),
    "mixed": ([1, 0, 1, 2], [0, 2, -1, 1]),
}
GELU = pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])


def lora_stack(
    layout: str, k: int, n: int, dtype: torch.dtype, seed: int, pad: float = 0.0
) -> tuple[torch.Tensor, LoRAStack]:
    """Return rows x [T, K] in `layout` and a stack of len(RANKS) adapters (A and B hold `pad` past each
    slot's rank: zero as the manager leaves them, or NaN to catch a stray read)."""
    lengths, slots = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    s, r = len(RANKS), max(RANKS)
    x = torch.randn(sum(lengths), k, generator=gen)
    a = torch.randn(s, r, k, generator=gen) / k**0.5
    b = torch.randn(s, n, r, generator=gen) / r**0.5
    for slot, rank in enumerate(RANKS):
        a[slot, rank:] = pad
        b[slot, :, rank:] = pad
    tables = (
        torch.tensor([0, *lengths]).cumsum(0).to(torch.int32),
        torch.tensor(slots, dtype=torch.int32),
        torch.tensor(RANKS, dtype=torch.int32),
        torch.tensor([0.5, 2.0, 1.25]),
    )
    stack = LoRAStack(a.to(DEVICE, dtype), b.to(DEVICE, dtype), *(t.to(DEVICE) for t in tables))
    return x.to(DEVICE, dtype), stack


def int8_weight(n: int, k: int, groups: int, seed: int) -> StoredWeight:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, groups, generator=gen) / (127 * k**0.5)
    return StoredWeight(q.to(DEVICE), scales.to(DEVICE), INT8 if groups == 1 else INT8_GROUPED)


def int4_weight(n: int, k: int, group: int, seed: int) -> StoredWeight:
    """Return an int4 weight of K columns, padded to whole groups of `group` as Int4Linear stores it."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 16, (n, groups * group), generator=gen, dtype=torch.uint8)
    q[:, k:] = 0
    scales = torch.rand(n, groups, generator=gen) / (8 * k**0.5)
    mins = -8 * scales + torch.randn(n, groups, generator=gen) * 0.01
    qweight, qscales = pack_int4_ref(q, scales, mins)
    return StoredWeight(qweight.to(DEVICE), qscales.to(DEVICE), INT4)


def fp_weight(n: int, k: int, dtype: torch.dtype, seed: int) -> StoredWeight:
    gen = torch.Generator().manual_seed(seed)
    return StoredWeight((torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype), None, FP)


def run(
    x: torch.Tensor,
    stored: StoredWeight,
    bias: torch.Tensor | None,
    gelu: bool,
    stack: LoRAStack,
    config: GemmConfig,
) -> torch.Tensor:
    return weight_mm(x, stored.weight, stored.scales, stored.format, bias, gelu, config, stack)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bias_of(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("split_k", [1, 3])
@GELU
def test_fp32_weights_with_the_update_match_the_reference(layout: str, split_k: int, gelu: bool) -> None:
    k, n = 50, 37  # neither a multiple of a tile
    x, stack = lora_stack(layout, k, n, torch.float32, seed=1)
    stored, bias = fp_weight(n, k, torch.float32, seed=2), bias_of(n, torch.float32)
    out = run(x, stored, bias, gelu, stack, GemmConfig(block_k=16, split_k=split_k))
    torch.testing.assert_close(out, by_hand(x, stored.weight, bias, gelu, stack), atol=2e-5, rtol=1e-5)
    # Rows on an adapter moved far past the tolerance; the row on slot -1 is the projection alone.
    bare = weight_mm(x, stored.weight, None, FP, bias, gelu, GemmConfig(block_k=16, split_k=split_k))
    lengths, slots = LAYOUTS[layout]
    updated = (torch.tensor(slots).repeat_interleave(torch.tensor(lengths)) >= 0).to(DEVICE)
    assert (out - bare).abs().amax(dim=1)[updated].min() > 0.05
    torch.testing.assert_close(out[~updated], bare[~updated], atol=2e-5, rtol=1e-5)


@GELU
def test_fp16_weights_with_the_update_match_the_reference(gelu: bool) -> None:
    k, n = 72, 40
    x, stack = lora_stack("mixed", k, n, torch.float16, seed=3)
    stored, bias = fp_weight(n, k, torch.float16, seed=4), bias_of(n, torch.float16)
    ref = lora_linear_ref(x.float(), fp32(stored), bias.float(), gelu, fp32_stack(stack))
    for config in (GemmConfig(), GemmConfig(block_k=16, split_k=2)):
        assert relative_error(run(x, stored, bias, gelu, stack, config), ref) < 2e-3


@pytest.mark.parametrize("groups", [1, 3], ids=["per-channel", "q8_0-groups"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_int8_weights_with_the_update_match_the_reference(groups: int, split_k: int) -> None:
    k, n = 96, 37
    x, stack = lora_stack("mixed", k, n, torch.float32, seed=5)
    stored, bias = int8_weight(n, k, groups, seed=6), bias_of(n, torch.float32)
    config = GemmConfig(block_k=32 if groups > 1 else 16, split_k=split_k)
    out = run(x, stored, bias, True, stack, config)
    assert relative_error(out, lora_linear_ref(x, stored, bias, True, stack)) < 1e-5


@pytest.mark.parametrize(
    ("k", "group", "block_k", "split_k"),
    [
        (200, 64, None, 2),  # a ragged K (the last group short, padded), one group a step, K split
        (200, 64, None, 3),
        (128, 32, 64, 1),  # two groups a step, dequantised in registers
        (200, 64, 128, 2),
    ],
)
@GELU
def test_int4_weights_with_the_update_match_the_reference(
    k: int, group: int, block_k: int | None, split_k: int, gelu: bool
) -> None:
    n = 24
    x, stack = lora_stack("decode", k, n, torch.float32, seed=k + group)
    stored, bias = int4_weight(n, k, group, seed=7), bias_of(n, torch.float32)
    out = run(x, stored, bias, gelu, stack, GemmConfig(block_k=block_k, split_k=split_k))
    assert relative_error(out, lora_linear_ref(x, stored, bias, gelu, stack)) < 1e-5


def test_it_never_reads_past_a_slots_rank() -> None:
    # NaN past each slot's rank in A and B: one stray read would reach its row's output.
    k, n = 40, 20
    x, stack = lora_stack("mixed", k, n, torch.float32, seed=8, pad=float("nan"))
    stored = fp_weight(n, k, torch.float32, seed=8)
    out = run(x, stored, None, False, stack, GemmConfig(block_k=16, split_k=2))
    assert not out.isnan().any()
    _, clean = lora_stack("mixed", k, n, torch.float32, seed=8)
    torch.testing.assert_close(out, lora_linear_ref(x, stored, None, False, clean), atol=2e-5, rtol=1e-5)


def test_lora_linear_takes_the_projections_weight_as_stored() -> None:
    k, n = 64, 33
    x, stack = lora_stack("decode", k, n, torch.float32, seed=10)
    for stored in (fp_weight(n, k, torch.float32, 11), int8_weight(n, k, 1, 12), int4_weight(n, k, 32, 13)):
        ref = lora_linear_ref(x, stored, None, True, stack)
        assert relative_error(lora_linear(x, stored, None, True, stack), ref) < 1e-5


def test_it_refuses_what_it_cannot_read() -> None:
    k, n = 32, 16
    x, stack = lora_stack("decode", k, n, torch.float32, seed=0)
    stored = fp_weight(n, k, torch.float32, seed=0)
    rows = torch.zeros(LORA_MAX_ROWS + 1, k, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        run(rows, stored, None, False, stack, GemmConfig())
    with pytest.raises(ValueError, match="LoRA stacks"):
        run(x, fp_weight(n + 1, k, torch.float32, 0), None, False, stack, GemmConfig())
    bad_tables = LoRAStack(stack.a, stack.b, stack.seg_indptr.long(), *stack.tables()[1:])
    with pytest.raises(ValueError, match="int32"):
        run(x, stored, None, False, bad_tables, GemmConfig())


def by_hand(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool, stack: LoRAStack
) -> torch.Tensor:
    """Return F.linear(x, W) + bias + scale * (x A^T) B^T, then GELU, row by row (each row's own slot)."""
    out = F.linear(x, weight, bias)
    bounds, slots = stack.seg_indptr.tolist(), stack.seg_slots.tolist()
    for start, end, slot in zip(bounds[:-1], bounds[1:], slots, strict=True):
        if slot >= 0:
            r = int(stack.ranks[slot])
            for row in range(start, end):
                update = (x[row] @ stack.a[slot, :r].T) @ stack.b[slot, :, :r].T
                out[row] += float(stack.scales[slot]) * update
    return F.gelu(out, approximate="tanh") if gelu else out


def fp32(stored: StoredWeight) -> StoredWeight:
    return StoredWeight(stored.weight.float(), None, stored.format)


def fp32_stack(stack: LoRAStack) -> LoRAStack:
    return LoRAStack(stack.a.float(), stack.b.float(), *stack.tables())


def test_the_update_never_takes_the_one_row_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one-row register kernel (GemmConfig.gemv) takes no LoRA operands: a one-row step on an adapter
    # takes the few-rows tile shape instead of dropping its update.
    import kernels.quant_linear as quant_linear

    shapes = {1: GemmConfig(block_n=8, block_k=64, gemv=True), 2: GemmConfig(block_n=16, block_k=32)}
    monkeypatch.setattr(quant_linear, "tuned_config", lambda device, fmt, m, *_: shapes.get(min(m, 2)))
    assert quant_linear.tile_config(torch.device(DEVICE), FP, 1, 20, 40, 0) == shapes[2]
    k, n = 40, 20
    x, stack = lora_stack("one-row", k, n, torch.float32, seed=14)
    stored = fp_weight(n, k, torch.float32, seed=14)
    ref = lora_linear_ref(x, stored, None, False, stack)
    for out in (lora_linear(x, stored, None, False, stack), run(x, stored, None, False, stack, GemmConfig())):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one-row"):
        run(x, stored, None, False, stack, shapes[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weight", ["fp16", "int8", "int4-g64"])
def test_it_replays_in_a_cuda_graph_with_new_slots(weight: str) -> None:
    # GPT-2 XL's MLP up-projection with GELU, three decode rows; captured once, then new slots copied into
    # the same table before each replay (the decode graphs' way): each replay follows them.
    k, n = 1600, 6400
    x, stack = lora_stack("decode", k, n, torch.float16, seed=15)
    stored = {
        "fp16": lambda: fp_weight(n, k, torch.float16, 16),
        "int8": lambda: int8_weight(n, k, 1, 16),
        "int4-g64": lambda: int4_weight(n, k, 64, 16),
    }[weight]()
    bias = bias_of(n, torch.float16)
    lora_linear(x, stored, bias, True, stack)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_linear(x, stored, bias, True, stack)
    for slots in ([2, -1, 0], [0, 1, -1], [-1, -1, 2]):
        stack.seg_slots.copy_(torch.tensor(slots))
        graph.replay()
        torch.cuda.synchronize()
        ref = lora_linear_ref(x.float(), fp32_weight(stored), bias.float(), True, fp32_stack(stack))
        assert relative_error(out, ref) < 2e-3, slots


def fp32_weight(stored: StoredWeight) -> StoredWeight:
    return fp32(stored) if stored.format == FP else stored
