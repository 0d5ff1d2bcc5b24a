"""The one-launch LoRA kernel (lora_fused), lora_apply's choice between it and shrink + expand, and the
warm-up that compiles every launch variant before the first step; under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from gpu_worker.layers.context import AttentionMetadata, ForwardContext, LoRAMetadata
from gpu_worker.layers.linear import MergedLinear
from gpu_worker.lora.layer import LoRALinear
from kernels.backend import KernelBackend
from kernels.reference import lora_apply_ref
from tests.kernels.test_lora import DEVICE, LAYOUTS, Case, assert_close

pytest.importorskip("triton")
import kernels.lora as lora_kernels  # noqa: E402
from kernels.lora import Tiling, lora_apply, lora_fused, lora_warm_up  # noqa: E402

GELU = pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
KERNELS = {
    name: getattr(lora_kernels, name)
    for name in (
        "_shrink_rows_kernel",
        "_expand_rows_kernel",
        "_shrink_tiles_kernel",
        "_expand_tiles_kernel",
        "_fused_rows_kernel",
    )
}
# Small thresholds so that a few dozen rows reach every path: fused up to 6 rows apart, shrink + expand
# rows apart past that, row tiles of 16 and of 64.
SMALL = Tiling(
    min_programs=16, long_segment=4, block_k=16, max_block_n=32, fused_max_rows=6, fused_min_programs=4
)


@contextmanager
def launches() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record (kernel name, Triton's compile key) of every LoRA kernel launch inside the block: the key is
    what Triton's JIT caches a compiled variant under (argument types, integer and alignment
    specialisations, constexprs, launch options), so a key not seen before is a compile on a GPU."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    seen: list[tuple[str, tuple[Any, ...]]] = []
    hooks = []
    for name, kernel in KERNELS.items():
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **_jit_options(kernel))
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)

        def hook(*args: Any, _name: str = name, _binder: Any = binder, **kwargs: Any) -> None:
            _, specialization, options = _binder(*args, **kwargs)
            seen.append((_name, (*map(tuple, specialization), *sorted(options.items()))))

        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    try:
        yield seen
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)


def _jit_options(kernel: Any) -> dict[str, Any]:
    """Return the specialisation options an interpreted kernel was decorated with."""
    options = {"do_not_specialize": None, "do_not_specialize_on_alignment": None}
    return {key: kernel.kwargs.get(key) for key in options}


def fused_stack_case(t: int, seed: int = 0) -> tuple[LoRALinear, torch.Tensor, list[int], list[int]]:
    """Return a LoRALinear over a three-shard projection with tanh-GELU, three adapters of mixed ranks that
    target 1-3 shards each (packed by LoRALinear.pack), its input rows, and a layout over them."""
    gen = torch.Generator().manual_seed(seed)
    base = MergedLinear(ForwardContext(), 23, {"q": 5, "k": 7, "v": 9})
    base.gelu = True
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / 5)
    base.to(DEVICE)
    layer = LoRALinear(base, max_loras=3, max_rank=8, dtype=torch.float32)
    targets = [{"q": 3}, {"k": 8, "v": 2}, {"q": 5, "k": 1, "v": 8}]
    for slot, shards in enumerate(targets):
        pieces = {}
        for shard, rank in shards.items():
            start, end = base.shard_rows[shard]
            lora_a = torch.randn(rank, 23, generator=gen) / 5
            pieces[shard] = (lora_a, torch.randn(end - start, rank, generator=gen) / 3)
        layer.set_slot(slot, *layer.pack(pieces, torch.float32), scale=0.5 + slot)
    x = torch.randn(t, 23, generator=gen).to(DEVICE)
    return layer, x, [1] * t, [i % 4 - 1 for i in range(t)]  # slot -1, 0, 1, 2, -1, ...


def run_layer(layer: LoRALinear, x: torch.Tensor, lengths: list[int], slots: list[int]) -> torch.Tensor:
    bounds = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE, torch.int32)
    lora = LoRAMetadata(bounds, torch.tensor(slots, dtype=torch.int32, device=DEVICE))
    metadata = AttentionMetadata(torch.zeros(0), bounds, bounds, bounds, 1, 1, lora=lora)
    with layer.context.use(metadata), torch.no_grad():
        return layer(x)


def triton_backend(fused: bool, tiling: Tiling = SMALL) -> KernelBackend:
    """Return the references with this module's Triton LoRA kernels in (CPU tensors, interpreted)."""
    return KernelBackend(
        lora_apply=functools.partial(lora_apply, fused=fused, tiling=tiling),
        lora_warm_up=functools.partial(lora_warm_up, fused=fused, tiling=tiling),
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@GELU
def test_fused_matches_the_reference(layout: str, dtype: torch.dtype, gelu: bool) -> None:
    case = Case(layout, k=40, n=36, dtype=dtype, seed=3)
    tables = (*case.tables(), case.scales)
    expected = lora_apply_ref(case.y.clone(), case.x, case.a, case.b, *tables, gelu)
    out = lora_fused(case.y.clone(), case.x, case.a, case.b, *tables, gelu, tiling=SMALL)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@GELU
def test_fused_equals_shrink_then_expand(layout: str, gelu: bool) -> None:
    case = Case(layout, k=33, n=19, dtype=torch.float32, seed=5)
    tables = (*case.tables(), case.scales)
    fused = lora_fused(case.y.clone(), case.x, case.a, case.b, *tables, gelu, tiling=SMALL)
    split = lora_apply(case.y.clone(), case.x, case.a, case.b, *tables, gelu, fused=False, tiling=SMALL)
    assert_close(fused, split, torch.float32)
    if not gelu:  # rows without an adapter are left exactly as they were
        assert torch.equal(fused[case.bare_rows], case.y[case.bare_rows])


def test_fused_never_reads_past_a_slots_rank() -> None:
    # NaN past each slot's rank: one stray read of A or B would reach its row's output.
    case = Case("decode", k=24, n=20, dtype=torch.float32, pad=float("nan"), seed=2)
    out = lora_fused(case.y.clone(), case.x, case.a, case.b, *case.tables(), case.scales, True, tiling=SMALL)
    assert not out.isnan().any()
    clean = Case("decode", k=24, n=20, dtype=torch.float32, seed=2)
    assert_close(
        out,
        lora_apply_ref(clean.y, clean.x, clean.a, clean.b, *clean.tables(), clean.scales, True),
        torch.float32,
    )


@pytest.mark.parametrize(("layout", "fused", "kernels"), [
    ("decode", True, {"_fused_rows_kernel"}),
    ("decode", False, {"_shrink_rows_kernel", "_expand_rows_kernel"}),
    ("prefill", True, {"_shrink_tiles_kernel", "_expand_tiles_kernel"}),
])  # fmt: skip
def test_apply_takes_one_launch_for_decode_rows_only(layout: str, fused: bool, kernels: set[str]) -> None:
    case = Case(layout, k=24, n=20, dtype=torch.float32, seed=4)
    tables = (*case.tables(), case.scales)
    with launches() as seen:
        out = lora_apply(case.y.clone(), case.x, case.a, case.b, *tables, True, fused=fused)
    assert {name for name, _ in seen} == kernels
    assert len(seen) == len(kernels)  # one launch each: the GELU is in the fused epilogue, not a kernel
    assert_close(out, lora_apply_ref(case.y.clone(), case.x, case.a, case.b, *tables, True), torch.float32)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_a_lora_linear_over_fused_shards_with_gelu_matches_the_reference(fused: bool) -> None:
    layer, x, lengths, slots = fused_stack_case(t=9)
    expected = run_layer(layer, x, lengths, slots)  # the context's default backend: the references
    layer.context.backend = triton_backend(fused)
    assert_close(run_layer(layer, x, lengths, slots), expected, torch.float32)
    # A prefill-shaped step (one long segment per adapter) through the same layer.
    layer.context.backend = KernelBackend()
    expected_prefill = run_layer(layer, x, [4, 5], [2, 0])
    layer.context.backend = triton_backend(fused)
    assert_close(run_layer(layer, x, [4, 5], [2, 0]), expected_prefill, torch.float32)


def random_layouts(max_rows: int, max_segments: int, count: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield `count` random steps: decodes, prefill chunks and mixes of them, within the limits."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(count):
        t = int(torch.randint(1, max_rows + 1, (1,), generator=gen))
        g = int(torch.randint(1, min(t, max_segments) + 1, (1,), generator=gen))
        cuts = sorted(torch.randperm(t - 1, generator=gen)[: g - 1].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, t], strict=True)]
        yield lengths, [int(s) for s in torch.randint(-1, 3, (len(lengths),), generator=gen)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_after_warm_up_no_step_compiles_a_new_variant(fused: bool) -> None:
    # What made a hot-loaded adapter's first step stall: its layout (a prefill beside running decodes)
    # needed a kernel variant no earlier step had, and Triton compiled it inside the step.
    max_rows, max_segments = 72, 12
    layer, x, _, _ = fused_stack_case(t=max_rows)
    layer.context.backend = triton_backend(fused)
    with launches() as warmed:
        layer.warm_up(max_rows, max_segments)
    with launches() as stepped:
        for lengths, slots in random_layouts(max_rows, max_segments, count=12):
            t = sum(lengths)
            run_layer(layer, x[:t], lengths, slots)
    assert stepped and set(stepped) <= set(warmed)


@pytest.mark.parametrize("tiling", [Tiling(), SMALL], ids=["default", "small"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_the_launch_plans_are_every_plan_of_every_layout(tiling: Tiling, fused: bool) -> None:
    # Against every (rows, segments) pair, not the three segment counts per row count and the bisection.
    max_rows, max_segments, k, n, r = 110, 24, 23, 21, 48
    found = lora_kernels.lora_launch_plans(max_rows, max_segments, k, n, r, fused, tiling)
    every = {
        lora_kernels.launch_plan(t, g, k, n, r, fused, tiling)
        for t in range(1, max_rows + 1)
        for g in range(1, min(t, max_segments) + 1)
    }
    assert set(found) == every
    assert all(
        lora_kernels.launch_plan(*layout, k, n, r, fused, tiling) == plan for plan, layout in found.items()
    )
