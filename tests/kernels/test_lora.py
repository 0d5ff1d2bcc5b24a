"""Triton multi-LoRA shrink / expand against their torch references: mixed ranks in one padded stack, rows
without an adapter, empty segments, decode- and prefill-style layouts, odd shapes; under TRITON_INTERPRET=1
on CPU, and at GPT-2's sizes and inside a CUDA graph on a GPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.reference import lora_expand_ref, lora_shrink_ref

pytest.importorskip("triton")
from kernels.backend import cuda_backend  # noqa: E402
from kernels.lora import Tiling, lora_apply, lora_expand, lora_shrink  # noqa: E402
from kernels.quant_linear import LORA_FOLD_ROWS, lora_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = (3, 8, 16)  # three slots, padded to R = 16
# (rows per segment, slot per segment; -1: no adapter). Rows past the last segment belong to none (the
# padding rows of a CUDA-graph batch).
LAYOUTS = {
    "decode": ([1] * 9, [0, -1, 2, 1, 2, 2, -1, 0, 1]),
    "prefill": ([37, 0, 19], [1, 0, 2]),
    "mixed": ([13, 0, 1, 21, 1, 5], [2, 1, -1, 0, 1, 2]),
    "padded": ([1, 1, 17, 1], [1, -1, 0, 2]),  # + 6 rows past the last segment
}
PADDING_ROWS = {"padded": 6}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
# Every layout through each path, with tiny tiles: a K step of 16, K split over several programs, 16
# columns per expand program; row tiles of 64 from 4 rows per segment on.
TILES = Tiling(min_programs=64, per_row=0.0, long_segment=4, block_k=16, max_block_n=16)
ROWS = Tiling(min_programs=1, per_row=1e9, block_k=16, max_block_n=32)  # no K split: the default has it
TILINGS = pytest.mark.parametrize("tiling", [Tiling(), TILES, ROWS], ids=["default", "tiles", "rows"])


class Case:
    """A step's rows x [T, K] and output y [T, N], a stack of S adapters (A [S, R, K], B [S, N, R]) whose
    columns past each slot's rank hold `pad` (zero as the loader leaves them, or NaN to catch stray reads)."""

    def __init__(
        self,
        layout: str,
        k: int,
        n: int,
        dtype: torch.dtype,
        pad: float = 0.0,
        seed: int = 0,
        ranks: tuple[int, ...] = RANKS,
    ):
        lengths, slots = LAYOUTS[layout]
        gen = torch.Generator().manual_seed(seed)
        t, s, r = sum(lengths) + PADDING_ROWS.get(layout, 0), len(ranks), max(ranks)
        self.x = torch.randn(t, k, generator=gen).to(DEVICE, dtype)
        self.y = torch.randn(t, n, generator=gen).to(DEVICE, dtype)
        a = torch.randn(s, r, k, generator=gen) / k**0.5
        b = torch.randn(s, n, r, generator=gen) / r**0.5
        for slot, rank in enumerate(ranks):
            a[slot, rank:] = pad
            b[slot, :, rank:] = pad
        self.a, self.b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
        bounds = torch.tensor([0, *lengths]).cumsum(0)
        self.seg_indptr = bounds.to(DEVICE, torch.int32)
        self.seg_slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
        self.ranks = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
        self.scales = torch.tensor([0.5, 2.0, 1.25], device=DEVICE)
        slot_of_row = torch.full((t,), -1)
        for g, slot in enumerate(slots):
            slot_of_row[bounds[g] : bounds[g + 1]] = slot
        self.slot_of_row = slot_of_row.to(DEVICE)  # [T]
        self.bare_rows = self.slot_of_row < 0  # [T] rows no adapter touches

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.seg_indptr, self.seg_slots, self.ranks

    def h(self) -> torch.Tensor:
        return lora_shrink_ref(self.x, self.a, *self.tables())


def bits(t: torch.Tensor) -> torch.Tensor:
    """Return t's raw bits (as integers of its width), so -0.0 and +0.0 differ."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@TILINGS
def test_shrink_matches_its_reference(layout: str, dtype: torch.dtype, tiling: Tiling) -> None:
    case = Case(layout, k=72, n=40, dtype=dtype)  # K = 72: not a multiple of the K step
    h = lora_shrink(case.x, case.a, *case.tables(), tiling=tiling)
    assert h.dtype == torch.float32 and h.shape == (case.x.shape[0], case.a.shape[1])
    assert_close(h, case.h(), torch.float32 if dtype == torch.float32 else torch.float16)
    assert not h[case.bare_rows].any()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@TILINGS
def test_expand_matches_its_reference_in_place(layout: str, dtype: torch.dtype, tiling: Tiling) -> None:
    case = Case(layout, k=24, n=50, dtype=dtype)  # N = 50: not a multiple of the column tile
    case.y[case.bare_rows, ::3] = -0.0  # a rewrite of y + 0 would turn these into +0.0
    h, before = case.h(), case.y.clone()
    expected = case.y.clone()
    lora_expand_ref(expected, h, case.b, *case.tables(), case.scales)
    lora_expand(case.y, h, case.b, *case.tables(), case.scales, tiling=tiling)
    assert_close(case.y, expected, dtype)  # y itself, updated in place
    assert torch.equal(bits(case.y[case.bare_rows]), bits(before[case.bare_rows]))  # never written
    assert not torch.equal(case.y[~case.bare_rows], before[~case.bare_rows])


@pytest.mark.parametrize("layout", ["decode", "mixed"])
@pytest.mark.parametrize("tiling", [TILES, ROWS], ids=["tiles", "rows"])
def test_a_fused_stack_wider_than_a_power_of_two(layout: str, tiling: Tiling) -> None:
    # A fused q/k/v projection stacks three shards' A along R: R = 48 (tiles of 64), ranks up to all of it.
    case = Case(layout, k=40, n=36, dtype=torch.float16, ranks=(9, 48, 30), seed=11)
    h = lora_shrink(case.x, case.a, *case.tables(), tiling=tiling)
    assert h.shape == (case.x.shape[0], 48)
    assert_close(h, case.h(), torch.float16)
    expected = case.y.clone()
    lora_expand_ref(expected, h, case.b, *case.tables(), case.scales)
    lora_expand(case.y, h, case.b, *case.tables(), case.scales, tiling=tiling)
    assert_close(case.y, expected, torch.float16)


@pytest.mark.parametrize("layout", ["decode", "mixed"])
@pytest.mark.parametrize("tiling", [TILES, ROWS], ids=["tiles", "rows"])
def test_it_never_reads_past_a_slots_rank(layout: str, tiling: Tiling) -> None:
    # NaN in every padded column of A and B, and in h past each row's rank (all of it for rows without an
    # adapter): one stray read would spread NaN into the output.
    case = Case(layout, k=40, n=30, dtype=torch.float32, pad=float("nan"), seed=3)
    h = lora_shrink(case.x, case.a, *case.tables(), tiling=tiling)
    assert torch.isfinite(h).all()
    assert_close(h, case.h(), torch.float32)
    rank_of_row = torch.tensor([RANKS[s] if s >= 0 else 0 for s in case.slot_of_row.tolist()], device=DEVICE)
    in_rank = torch.arange(h.shape[1], device=DEVICE)[None, :] < rank_of_row[:, None]  # [T, R]
    h_nan = torch.where(in_rank, h, float("nan"))
    y = case.y.clone()
    lora_expand(y, h_nan, case.b, *case.tables(), case.scales, tiling=tiling)
    expected = case.y.clone()
    lora_expand_ref(expected, h, case.b, *case.tables(), case.scales)
    assert torch.isfinite(y).all()
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("tiling", [TILES, ROWS], ids=["tiles", "rows"])
def test_a_slot_past_the_stack_reads_as_no_adapter(tiling: Tiling) -> None:
    # A corrupt slot index must not read another tenant's memory or crash the step: its rows are left alone.
    case = Case("decode", k=24, n=20, dtype=torch.float32)
    case.seg_slots[2] = len(RANKS)
    before = case.y.clone()
    h = lora_shrink(case.x, case.a, *case.tables(), tiling=tiling)
    lora_expand(case.y, h, case.b, *case.tables(), case.scales, tiling=tiling)
    assert not h[2].any() and torch.equal(case.y[2], before[2])
    assert h[0].any() and not torch.equal(case.y[0], before[0])


def test_it_takes_strided_views_and_an_empty_step() -> None:
    # x and y as a fused projection hands them over: column slices of wider activations.
    case = Case("mixed", k=24, n=20, dtype=torch.float32, seed=5)
    wide_x = torch.cat([torch.randn_like(case.x), case.x], dim=1)
    wide_y = torch.cat([case.y, torch.randn_like(case.y)], dim=1)
    h = lora_shrink(wide_x[:, 24:], case.a, *case.tables())
    assert_close(h, case.h(), torch.float32)
    rest = wide_y[:, 20:].clone()
    lora_expand(wide_y[:, :20], h, case.b, *case.tables(), case.scales)
    lora_expand_ref(case.y, h, case.b, *case.tables(), case.scales)
    assert_close(wide_y[:, :20], case.y, torch.float32)
    assert torch.equal(wide_y[:, 20:], rest)
    empty = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    assert lora_shrink(case.x[:0], case.a, empty, none, case.ranks).shape == (0, case.a.shape[1])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: setattr(c, "seg_indptr", c.seg_indptr.long()), "int32"),
        (lambda c: setattr(c, "ranks", c.ranks[:2]), "ranks"),
        (lambda c: setattr(c, "seg_indptr", c.seg_indptr[:-1]), "seg_indptr"),
        (lambda c: setattr(c, "a", c.a[:, :, :-1]), "must be"),
        (lambda c: setattr(c, "seg_slots", c.seg_slots.to("meta")), "must be on"),
        (lambda c: setattr(c, "a", c.a.to("meta")), "must be on"),
    ],
)
def test_it_rejects_tables_it_cannot_read(change: Callable[[Case], None], match: str) -> None:
    case = Case("mixed", k=24, n=20, dtype=torch.float32)
    change(case)
    with pytest.raises(ValueError, match=match):
        lora_shrink(case.x, case.a, *case.tables())


def test_expand_rejects_a_half_precision_h() -> None:
    case = Case("mixed", k=24, n=20, dtype=torch.float32)
    with pytest.raises(ValueError, match="float32"):
        lora_expand(case.y, case.h().half(), case.b, *case.tables(), case.scales)


def test_the_reference_is_the_per_row_low_rank_update() -> None:
    # The references against the formula itself, one row at a time: y_i += scale * B_s[:, :r] A_s[:r] x_i.
    case = Case("mixed", k=24, n=20, dtype=torch.float32, seed=7)
    y = case.y.clone()
    lora_expand_ref(y, case.h(), case.b, *case.tables(), case.scales)
    for i, slot in enumerate(case.slot_of_row.tolist()):
        expected = case.y[i].clone()
        if slot >= 0:
            r = RANKS[slot]
            expected += case.scales[slot] * (case.b[slot, :, :r] @ (case.a[slot, :r] @ case.x[i]))
        assert_close(y[i], expected, torch.float32)


def test_the_cuda_backend_runs_these_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = cuda_backend()
    assert backend.lora_shrink is lora_shrink and backend.lora_expand is lora_expand
    # Shrink + expand by default (the fused kernel measured slower on an H100); RUVON_LORA_FUSED=1 opts in.
    assert backend.lora_apply.func is lora_apply and backend.lora_apply.keywords == {"fused": False}
    monkeypatch.setenv("RUVON_LORA_FUSED", "1")
    assert cuda_backend().lora_apply.keywords == {"fused": True}
    # Steps of a few rows add the update in the projection's own launch; RUVON_LORA_EPILOGUE=0 opts out.
    assert backend.lora_linear is lora_linear and backend.lora_fold_rows == LORA_FOLD_ROWS > 0
    monkeypatch.setenv("RUVON_LORA_EPILOGUE", "0")
    assert cuda_backend().lora_fold_rows == 0


# Steps at real sizes: decode rows only (the per-row path), and decode rows beside a prefill chunk or
# prefill chunks alone (row tiles).
GPU_STEPS = {
    "decode-1": [1],
    "decode-16": [1] * 16,
    "decode-256": [1] * 256,
    "mixed-256": [1] * 64 + [192],
    "prefill-512": [64] * 8,
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("k", "n"), [(768, 2304), (1600, 4800), (3072, 768), (6400, 1600)])
@pytest.mark.parametrize("step", sorted(GPU_STEPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_it_matches_the_reference_at_gpt2_sizes(k: int, n: int, step: str, dtype: torch.dtype) -> None:
    lengths = GPU_STEPS[step]
    rows, slots, r = sum(lengths), 8, 16
    gen = torch.Generator().manual_seed(k + n + rows)
    x = torch.randn(rows, k, generator=gen).to("cuda", dtype)
    a = (torch.randn(slots, r, k, generator=gen) / k**0.5).to("cuda", dtype)
    b = (torch.randn(slots, n, r, generator=gen) / r**0.5).to("cuda", dtype)
    ranks = torch.tensor([8, 16, 12, 8, 16, 10, 8, 16], dtype=torch.int32, device="cuda")
    seg_indptr = torch.tensor([0, *lengths]).cumsum(0).to("cuda", torch.int32)
    # Slots 0..7 then -1 (no adapter), repeating: a one-row step has an adapter, longer ones rows without.
    seg_slots = torch.arange(len(lengths)) % (slots + 1)
    seg_slots = torch.where(seg_slots == slots, -1, seg_slots).to("cuda", torch.int32)
    scales = torch.rand(slots, device="cuda") + 0.5
    h = lora_shrink(x, a, seg_indptr, seg_slots, ranks)
    h_ref = lora_shrink_ref(x, a, seg_indptr, seg_slots, ranks)
    assert ((h - h_ref).norm() / h_ref.norm()).item() < 1e-3
    y = torch.randn(rows, n, generator=gen).to("cuda", dtype)
    y_ref = y.clone()
    lora_expand(y, h, b, seg_indptr, seg_slots, ranks, scales)
    lora_expand_ref(y_ref, h_ref, b, seg_indptr, seg_slots, ranks, scales)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["decode", "mixed"])
def test_it_replays_in_a_cuda_graph_with_new_segment_tables(layout: str) -> None:
    # Captured once; new slots and segment bounds are copied into the same tensors before each replay.
    case = Case(layout, k=1600, n=4800, dtype=torch.float16)
    tables, y = case.tables(), case.y.clone()
    lora_expand(y, lora_shrink(case.x, case.a, *tables), case.b, *tables, case.scales)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = lora_shrink(case.x, case.a, *tables)
        lora_expand(y, h, case.b, *tables, case.scales)
    lengths, slots = LAYOUTS[layout]
    for new_lengths, new_slots in ((lengths, slots), (lengths[::-1], slots[1:] + slots[:1])):
        case.seg_indptr.copy_(torch.tensor([0, *new_lengths]).cumsum(0))
        case.seg_slots.copy_(torch.tensor(new_slots))
        y.copy_(case.y)
        graph.replay()
        expected = case.y.clone()
        lora_expand_ref(expected, case.h(), case.b, *tables, case.scales)
        assert ((y.float() - expected.float()).norm() / expected.float().norm()).item() < 2e-3
