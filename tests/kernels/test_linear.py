"""Triton small_m_linear against F.linear (+ tanh-GELU) in fp32: small shapes everywhere, GPT-2's on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from kernels.linear import MAX_KERNEL_M, MAX_SMALL_M, Tiling, linear, small_m_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative L2 error
# (N, K) of every linear layer in GPT-2 124M and XL: qkv, attention out, MLP up, MLP down.
GPT2_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
GPT2_XL_SHAPES = [(4800, 1600), (1600, 1600), (6400, 1600), (1600, 6400)]


def make_case(
    m: int, n: int, k: int, dtype: torch.dtype, seed: int, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return random x [M, K], weight [N, K] and bias [N], scaled like a trained layer's (outputs ~1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)


def expected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """Return F.linear (+ tanh-GELU) computed in fp32 from the same (rounded) inputs."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return F.gelu(out, approximate="tanh") if gelu else out


def check(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    tiling: Tiling | None = None,
) -> None:
    """Run the kernel; it must return x's dtype and shape and agree with the fp32 reference."""
    out = small_m_linear(x, weight, bias, gelu, tiling) if tiling else small_m_linear(x, weight, bias, gelu)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], weight.shape[0])
    ref = expected(x, weight, bias, gelu)
    error = ((out.float() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[x.dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("n", [24, 100])
@pytest.mark.parametrize("k", [32, 72])  # 72: not a multiple of the K step
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_it_matches_f_linear(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    x, weight, bias = make_case(m, n, k, dtype, seed=m * 1000 + n * 10 + k)
    check(x, weight, bias)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_it_applies_bias_and_gelu(with_bias: bool, gelu: bool, dtype: torch.dtype) -> None:
    x, weight, bias = make_case(5, 100, 72, dtype, seed=7)
    check(x, weight, bias if with_bias else None, gelu)


@pytest.mark.parametrize("m", [9, MAX_KERNEL_M])
def test_it_uses_the_tensor_core_path_up_to_max_kernel_m(m: int) -> None:
    # M in 9..16 is padded to 16 rows and multiplied with tl.dot instead of FMAs.
    x, weight, bias = make_case(m, 40, 72, torch.float32, seed=m)
    check(x, weight, bias, gelu=True)


@pytest.mark.parametrize("m", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_it_pads_few_rows_to_16_when_the_tensor_core_path_starts_lower(m: int, dtype: torch.dtype) -> None:
    x, weight, bias = make_case(m, 40, 72, dtype, seed=m)
    check(x, weight, bias, gelu=True, tiling=Tiling(dot_min_m=2, dot_block_k=16))


@pytest.mark.parametrize("m", [1, 5, MAX_KERNEL_M])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_it_accumulates_over_several_k_steps_and_column_blocks(m: int, dtype: torch.dtype) -> None:
    # Tiny tiles: 8 or 16 columns per program and a K step of 16, so K = 72 takes 5 steps, the last partial.
    tiny = Tiling(min_programs=8, tile=128, dot_block_k=16)
    x, weight, bias = make_case(m, 100, 72, dtype, seed=m)
    check(x, weight, bias, gelu=True, tiling=tiny)


def test_it_reads_a_row_strided_x() -> None:
    # x as the model may hand it over: a column slice of a wider activation.
    x, weight, bias = make_case(3, 24, 72, torch.float32, seed=3)
    wide = torch.cat([torch.randn_like(x), x], dim=1)  # [M, 2K]
    view = wide[:, 72:]
    assert not view.is_contiguous() and view.stride(1) == 1
    check(view, weight, bias, gelu=True)


def test_it_is_not_fooled_by_a_transposed_weight_view() -> None:
    _, weight, _ = make_case(1, 24, 32, torch.float32, seed=5)
    x = torch.randn(2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="row-major"):
        small_m_linear(x, weight.t(), None)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 32), (24, 40), (24,)), "must be"),
        (((MAX_KERNEL_M + 1, 32), (24, 32), (24,)), "at most"),
        (((2, 32), (24, 32), (23,)), "bias must be"),
    ],
)
def test_it_rejects_inputs_it_cannot_read(shapes: tuple, match: str) -> None:
    x, weight, bias = (torch.randn(*s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        small_m_linear(x, weight, bias)


def test_it_rejects_a_weight_of_another_dtype() -> None:
    x, weight, bias = make_case(2, 24, 32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="dtype"):
        small_m_linear(x, weight.half(), bias)


@pytest.mark.parametrize("gelu", [False, True])
def test_linear_is_exactly_f_linear_on_cpu(gelu: bool) -> None:
    x, weight, bias = make_case(2, 24, 32, torch.float32, seed=2, device="cpu")
    reference = F.linear(x, weight, bias)
    reference = F.gelu(reference, approximate="tanh") if gelu else reference
    assert torch.equal(linear(x, weight, bias, gelu), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n, k", GPT2_SHAPES + GPT2_XL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_it_matches_f_linear_at_real_sizes(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    x, weight, bias = make_case(m, n, k, dtype, seed=n + k + m, device="cuda")
    check(x, weight, bias, gelu=n == 4 * k)  # the MLP's up projection carries the GELU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", sorted({1, MAX_SMALL_M, MAX_SMALL_M + 1, MAX_KERNEL_M + 1}))
def test_linear_dispatches_by_rows_on_cuda(m: int) -> None:
    x, weight, bias = make_case(m, 768, 768, torch.float16, seed=m, device="cuda")
    out = linear(x, weight, bias, gelu=True)
    if m <= MAX_SMALL_M:
        assert torch.equal(out, small_m_linear(x, weight, bias, gelu=True))
    else:  # cuBLAS: bit-identical to F.linear + F.gelu
        assert torch.equal(out, F.gelu(F.linear(x, weight, bias), approximate="tanh"))
    ref = expected(x, weight, bias, gelu=True)
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_it_replays_in_a_cuda_graph() -> None:
    x, weight, bias = make_case(4, 1600, 1600, torch.float16, seed=9, device="cuda")
    small_m_linear(x, weight, bias, gelu=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = small_m_linear(x, weight, bias, gelu=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = expected(x, weight, bias, gelu=True)
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float16]
