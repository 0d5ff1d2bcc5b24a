"""Triton int8 / int4 GEMVs against their torch references (same signature, same layout), odd shapes, under
TRITON_INTERPRET=1 on CPU; and torch's CPU packed ops against the same references."""

from __future__ import annotations

import pytest
import torch

from kernels.backend import cpu_backend
from kernels.quant_cpu import int4_linear_cpu, int8_linear_cpu, pack_int4_cpu
from kernels.reference import int4_linear_ref, int8_linear_ref, pack_int4_ref, unpack_int4_ref

pytest.importorskip("triton")
from kernels.quant_linear import (  # noqa: E402
    FP,
    GemmConfig,
    int4_gemv,
    int4_linear,
    int8_gemv,
    int8_linear,
    plan,
    weight_mm,
)

PREFILL_M = 40  # more rows than one 16- or 32-row tile: the same kernel as a GEMM for prefill chunks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int8_case(m: int, n: int, k: int, groups: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, groups, generator=gen) / (127 * k**0.5)
    bias = torch.randn(n, generator=gen)
    return x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), bias.to(DEVICE)


def _int4_case(m: int, n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) / (8 * k**0.5)
    mins = -8 * scales + torch.randn(n, k // group, generator=gen) * 0.01
    bias = torch.randn(n, generator=gen)
    return x, q, scales, mins, bias


def _close(out: torch.Tensor, ref: torch.Tensor, tolerance: float = 1e-5) -> None:
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert error < tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("m", [1, 3, 16, PREFILL_M])
@pytest.mark.parametrize(("n", "k"), [(37, 96), (4, 200)])  # N not a multiple of the tile; K not of 128
@pytest.mark.parametrize("gelu", [False, True])
def test_int8_gemv_matches_its_reference_per_channel(m: int, n: int, k: int, gelu: bool) -> None:
    x, q, scales, bias = _int8_case(m, n, k, 1, seed=m * 100 + n + k)
    _close(int8_gemv(x, q, scales, bias, gelu), int8_linear_ref(x, q, scales, bias, gelu))


@pytest.mark.parametrize(("m", "n", "k"), [(1, 37, 96), (5, 20, 64)])
def test_int8_gemv_matches_its_reference_with_q8_0_groups(m: int, n: int, k: int) -> None:
    x, q, scales, bias = _int8_case(m, n, k, k // 32, seed=7)
    _close(int8_gemv(x, q, scales, None), int8_linear_ref(x, q, scales, None))


@pytest.mark.parametrize("m", [1, 4, 16, PREFILL_M])
@pytest.mark.parametrize(("n", "k", "group"), [(37, 96, 32), (24, 128, 64), (5, 256, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_gemv_matches_its_reference(m: int, n: int, k: int, group: int, with_bias: bool) -> None:
    x, q, scales, mins, bias = _int4_case(m, n, k, group, seed=m + n + k)
    qweight, qscales = pack_int4_ref(q, scales, mins)
    args = [t.to(DEVICE) for t in (x, qweight, qscales)]
    b = bias.to(DEVICE) if with_bias else None
    ref = int4_linear_ref(*args, b, with_bias)
    _close(int4_gemv(*args, b, with_bias), ref)
    _close(int4_gemv(*args, b, with_bias, config=GemmConfig(block_k=2 * group, split_k=1)), ref)


def test_int4_gemv_in_fp16() -> None:
    x, q, scales, mins, bias = _int4_case(2, 40, 128, 32, seed=3)
    qweight, qscales = pack_int4_ref(q, scales.half(), mins.half())
    x16 = x.half().to(DEVICE)
    out = int4_gemv(x16, qweight.to(DEVICE), qscales.to(DEVICE))
    assert out.dtype == torch.float16
    _close(out, int4_linear_ref(x16.float(), qweight.to(DEVICE), qscales.to(DEVICE).float()), 2e-3)


def test_the_reference_layout_round_trips() -> None:
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    qweight, _ = pack_int4_ref(q, torch.ones(3, 2), torch.zeros(3, 2))
    assert qweight.shape == (3, 32) and torch.equal(unpack_int4_ref(qweight), q)
    assert torch.equal(qweight[:, 0], q[:, 0] | (q[:, 1] << 4))  # low nibble: the even k


def test_the_gemvs_refuse_what_they_cannot_read() -> None:
    x, q, scales, mins, _ = _int4_case(1, 16, 96, 32, seed=0)
    qweight, qscales = pack_int4_ref(q, scales, mins)
    with pytest.raises(ValueError, match="G a power of two >= 32"):  # 3 groups of 32 read as groups of 48
        int4_gemv(x, qweight, qscales[:, :2].contiguous())
    with pytest.raises(ValueError, match="padded to whole groups"):  # x longer than the packed weight
        int4_gemv(torch.randn(1, 128), qweight, qscales)
    with pytest.raises(ValueError, match="groups dividing K"):
        int8_gemv(x, torch.zeros(16, 96, dtype=torch.int8), torch.ones(16, 5))
    with pytest.raises(ValueError, match="bias must be"):
        int8_gemv(x, torch.zeros(16, 96, dtype=torch.int8), torch.ones(16, 1), torch.ones(3))


@pytest.mark.parametrize(("m", "k", "group"), [(1, 80, 32), (3, 200, 64), (PREFILL_M, 576, 128)])
@pytest.mark.parametrize(
    "block_k", [None, 256]
)  # one group a step on raw values; or dequantised in registers
def test_int4_reads_a_weight_padded_to_whole_groups(m: int, k: int, group: int, block_k: int | None) -> None:
    # SmolLM2's K = 576 is 4.5 groups of 128: the packed weight carries K rounded up to whole groups and the
    # kernel reads x's true K; the padded columns' weights never meet an x value.
    k_pad = -(-k // group) * group
    x, q, scales, mins, bias = _int4_case(m, 24, k_pad, group, seed=k)
    qweight, qscales = (t.to(DEVICE) for t in pack_int4_ref(q, scales, mins))
    x_true = x[:, :k].contiguous().to(DEVICE)
    ref = int4_linear_ref(torch.nn.functional.pad(x_true, (0, k_pad - k)), qweight, qscales, bias.to(DEVICE))
    config = GemmConfig(block_k=block_k)
    _close(int4_gemv(x_true, qweight, qscales, bias.to(DEVICE), config=config), ref)


@pytest.mark.parametrize("m", [1, 5, PREFILL_M])
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_the_same_kernel_reads_plain_fp_weights(m: int, split_k: int | None) -> None:
    gen = torch.Generator().manual_seed(m)
    x, w, bias = torch.randn(m, 300, generator=gen), torch.randn(37, 300, generator=gen), torch.randn(37)
    config = GemmConfig(split_k=split_k, block_k=64)
    out = weight_mm(x.to(DEVICE), w.to(DEVICE), None, FP, bias.to(DEVICE), True, config)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, bias), approximate="tanh")
    _close(out.cpu(), ref)


def test_the_dispatchers_take_the_reference_off_cuda() -> None:
    x, q, scales, mins, bias = _int4_case(19, 16, 64, 32, seed=1)
    qweight, qscales = pack_int4_ref(q, scales, mins)
    assert torch.equal(int4_linear(x, qweight, qscales, bias), int4_linear_ref(x, qweight, qscales, bias))
    x8, q8, s8, b8 = (t.cpu() for t in _int8_case(2, 16, 64, 1, seed=2))
    assert torch.equal(int8_linear(x8, q8, s8, b8), int8_linear_ref(x8, q8, s8, b8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_torch_cpu_int4_matmul_matches_the_reference_to_bf16(group: int) -> None:
    x, q, scales, mins, bias = _int4_case(3, 48, 256, group, seed=group)
    out = int4_linear_cpu(x, *pack_int4_cpu(q, scales, mins), bias, True)
    _close(out, int4_linear_ref(x, *pack_int4_ref(q, scales, mins), bias, True), 1e-2)


def test_torch_cpu_int8_matmul_matches_the_reference_to_bf16() -> None:
    x, q, scales, bias = (t.cpu() for t in _int8_case(3, 48, 96, 1, seed=5))
    _close(int8_linear_cpu(x, q, scales, bias), int8_linear_ref(x, q, scales, bias), 1e-2)
    grouped = torch.rand(48, 3) / 100  # Q8_0 groups: the reference itself, exact
    assert torch.equal(int8_linear_cpu(x, q, grouped), int8_linear_ref(x, q, grouped))


def test_the_cpu_int4_packing_names_its_limits() -> None:
    with pytest.raises(ValueError, match="N a multiple of 16"):
        pack_int4_cpu(torch.zeros(20, 64, dtype=torch.uint8), torch.ones(20, 2), torch.zeros(20, 2))


def test_it_offers_the_kernels_in_the_backends() -> None:
    from kernels.backend import cuda_backend

    cuda = cuda_backend()
    assert cuda.int8_linear is int8_linear and cuda.int4_linear is int4_linear
    assert cuda.int4_pack is pack_int4_ref  # the layout the Triton kernel reads
    assert cpu_backend().int4_pack is pack_int4_cpu


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("gelu", [False, True])
def test_split_k_sums_slices_then_applies_bias_and_gelu(split_k: int, gelu: bool) -> None:
    x, q, scales, mins, bias = _int4_case(3, 20, 256, 32, seed=11)
    qweight, qscales = (t.to(DEVICE) for t in pack_int4_ref(q, scales, mins))
    x, bias = x.to(DEVICE), bias.to(DEVICE)
    ref = int4_linear_ref(x, qweight, qscales, bias, gelu)
    _close(int4_gemv(x, qweight, qscales, bias, gelu, split_k=split_k), ref)
    x8, q8, s8, b8 = _int8_case(2, 12, 200, 1, seed=12)  # K slices 128 + 72, on DEVICE
    _close(int8_gemv(x8, q8, s8, b8, gelu, split_k=split_k), int8_linear_ref(x8, q8, s8, b8, gelu))
    g8 = (torch.rand(12, 8) / 1000).to(DEVICE)  # Q8_0 groups: slices of whole groups
    x8 = torch.randn(2, 256).to(DEVICE)
    q8 = torch.randint(-127, 128, (12, 256), dtype=torch.int8).to(DEVICE)
    _close(int8_gemv(x8, q8, g8, None, False, split_k=split_k), int8_linear_ref(x8, q8, g8))


def test_split_k_is_chosen_where_n_is_small_and_k_large() -> None:
    wide = plan(1, 6400, 1600, FP, 0, GemmConfig())  # GPT-2 XL's MLP up projection: 200 tiles of 32
    narrow = plan(1, 1600, 6400, FP, 0, GemmConfig())  # its down projection: 50 tiles, K = 25 steps of 256
    assert wide.split_k == 1 and narrow.split_k == 4
    assert plan(512, 1600, 6400, FP, 0, GemmConfig()).split_k == 2  # prefill rows bring their own tiles
    assert plan(1, 64, 128, FP, 0, GemmConfig()).split_k == 1  # too few K steps to slice


@pytest.mark.parametrize(
    ("n", "k", "group", "block_k"), [(37, 96, 32, 64), (20, 200, 64, 128), (5, 576, 128, 256)]
)
@pytest.mark.parametrize("gelu", [False, True])
def test_the_one_row_kernel_reads_int4_like_the_tiles(
    n: int, k: int, group: int, block_k: int, gelu: bool
) -> None:
    # K 200 / g64 and 576 / g128 leave a ragged last group: the packed weight is padded, x has the true K.
    k_pad = -(-k // group) * group
    x, q, scales, mins, bias = _int4_case(1, n, k_pad, group, seed=n + k)
    qweight, qscales = (t.to(DEVICE) for t in pack_int4_ref(q, scales, mins))
    x_true = x[:, :k].contiguous().to(DEVICE)
    ref = int4_linear_ref(
        torch.nn.functional.pad(x_true, (0, k_pad - k)), qweight, qscales, bias.to(DEVICE), gelu
    )
    for block_n in (1, 4, 16):
        config = GemmConfig(block_n=block_n, block_k=block_k, gemv=True)
        _close(int4_gemv(x_true, qweight, qscales, bias.to(DEVICE), gelu, config=config), ref)


@pytest.mark.parametrize(
    ("n", "k", "groups", "block_k"), [(37, 96, 1, 64), (5, 200, 1, 128), (20, 256, 8, 64)]
)
def test_the_one_row_kernel_reads_int8_and_fp_weights(n: int, k: int, groups: int, block_k: int) -> None:
    x, q, scales, bias = _int8_case(1, n, k, groups, seed=n * k)
    config = GemmConfig(block_n=8, block_k=block_k, gemv=True)
    _close(int8_gemv(x, q, scales, bias, True, config=config), int8_linear_ref(x, q, scales, bias, True))
    w = q.float() * scales.repeat_interleave(k // groups, dim=1)
    out = weight_mm(x, w, None, FP, bias, False, config)
    _close(out, torch.nn.functional.linear(x, w, bias))


def test_the_one_row_kernel_is_taken_only_for_one_row() -> None:
    # A config that asks for it still runs the tiles for more rows (the same answer either way).
    x, q, scales, mins, bias = _int4_case(3, 20, 128, 32, seed=5)
    qweight, qscales = (t.to(DEVICE) for t in pack_int4_ref(q, scales, mins))
    x = x.to(DEVICE)
    out = int4_gemv(x, qweight, qscales, None, config=GemmConfig(block_n=16, gemv=True))
    _close(out, int4_linear_ref(x, qweight, qscales))
