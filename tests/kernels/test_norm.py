"""Triton add + LayerNorm / RMSNorm against the references: small shapes everywhere (CPU interpreter), real on a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from gpu_worker.loading.loader import load_model
from gpu_worker.runner.kv_cache import forward_dense
from kernels.backend import KernelBackend
from kernels.reference import add_layer_norm_ref, add_rms_norm_ref

pytest.importorskip("triton")
from kernels.norm import add_layer_norm, add_rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# The interpreter rounds float32 -> bfloat16 towards zero (the GPU rounds to nearest): up to 1 ulp per rounding.
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
NormCase = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_norm_case(
    num_tokens: int, channels: int, dtype: torch.dtype, seed: int, device: str = DEVICE
) -> NormCase:
    """Return random x, residual [T, C], weight and bias [C]; weight and bias far from LayerNorm's 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, channels, generator=gen)
    residual = (
        3 * torch.randn(num_tokens, channels, generator=gen) + 1
    )  # a mean and scale for the norm to remove
    weight = torch.randn(channels, generator=gen)
    bias = torch.randn(channels, generator=gen)
    return tuple(t.to(dtype).to(device) for t in (x, residual, weight, bias))  # type: ignore[return-value]


def check_layer_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor
) -> None:
    """The kernel's (new residual, normed) must match the reference's within the dtype's tolerance."""
    got = add_layer_norm(x, residual, weight, bias, EPS)
    want = add_layer_norm_ref(x, residual, weight, bias, EPS)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g, w, **TOLERANCE[x.dtype])


def check_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    """The kernel's (new residual, normed) must match the reference's within the dtype's tolerance."""
    got = add_rms_norm(x, residual, weight, EPS)
    want = add_rms_norm_ref(x, residual, weight, EPS)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g, w, **TOLERANCE[x.dtype])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 64), (3, 96), (7, 200)]  # 96 and 200: not powers of two, so the mask matters


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "channels"), SHAPES)
def test_it_matches_the_layer_norm_reference(num_tokens: int, channels: int, dtype: torch.dtype) -> None:
    x, residual, weight, bias = make_norm_case(num_tokens, channels, dtype, seed=channels)
    check_layer_norm(x, residual, weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "channels"), SHAPES)
def test_it_matches_the_rms_norm_reference(num_tokens: int, channels: int, dtype: torch.dtype) -> None:
    x, residual, weight, _ = make_norm_case(num_tokens, channels, dtype, seed=channels)
    check_rms_norm(x, residual, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_it_normalises_x_itself_without_a_residual(dtype: torch.dtype) -> None:
    x, residual, weight, bias = make_norm_case(3, 96, dtype, seed=4)
    x = x + residual  # a mean and scale for the norm to remove
    check_layer_norm(x, None, weight, bias)
    check_rms_norm(x, None, weight)
    assert add_layer_norm(x, None, weight, bias, EPS)[0] is x
    assert add_rms_norm(x, None, weight, EPS)[0] is x


def test_it_stores_the_sum_rounded_to_the_dtype() -> None:
    # The new residual is the exact fp16 sum, bit for bit; the norm reads that rounded sum.
    x, residual, weight, bias = make_norm_case(7, 200, torch.float16, seed=5)
    assert torch.equal(add_layer_norm(x, residual, weight, bias, EPS)[0], x + residual)
    assert torch.equal(add_rms_norm(x, residual, weight, EPS)[0], x + residual)


def test_it_rounds_to_the_dtype_before_the_rms_weight_like_llama() -> None:
    # Rounding after the weight instead moves about a quarter of fp16 outputs by one ulp, inside any tolerance;
    # with llama's order only a reduction-order tie (rare) may differ.
    x, residual, weight, _ = make_norm_case(7, 200, torch.float16, seed=7)
    got = add_rms_norm(x, residual, weight, EPS)[1]
    want = add_rms_norm_ref(x, residual, weight, EPS)[1]
    assert (got != want).float().mean() < 0.02


def test_it_reads_strided_rows_of_a_fused_projection() -> None:
    # x as the model can produce it: a column slice of one [T, 3C] tensor (row stride 3C, not C).
    x, residual, weight, bias = make_norm_case(7, 96, torch.float32, seed=6)
    fused = torch.cat([torch.full_like(x, 9.0), x, -x], dim=1)
    x_view = fused.chunk(3, dim=1)[1]
    assert x_view.stride(0) == 3 * 96
    res_view = torch.cat([residual, residual], dim=1)[:, 96:]
    check_layer_norm(x_view, res_view, weight, bias)
    check_rms_norm(x_view, res_view, weight)
    check_layer_norm(x_view, None, weight, bias)


def test_it_reads_rows_with_a_column_stride() -> None:
    x, residual, weight, bias = make_norm_case(5, 64, torch.float32, seed=8)
    transposed = x.t().contiguous().t()  # same values, stride (1, T)
    assert transposed.stride(-1) != 1
    check_layer_norm(transposed, residual, weight, bias)
    check_rms_norm(transposed, residual, weight)


def test_it_returns_empty_outputs_for_no_tokens() -> None:
    x, residual, weight, bias = make_norm_case(0, 64, torch.float32, seed=9)
    new_residual, normed = add_layer_norm(x, residual, weight, bias, EPS)
    assert new_residual.shape == normed.shape == (0, 64)


def test_it_rejects_a_residual_of_another_shape() -> None:
    x, residual, weight, bias = make_norm_case(4, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, residual[:3], weight, bias, EPS)


def test_it_rejects_a_weight_of_another_dtype() -> None:
    x, residual, weight, _ = make_norm_case(4, 64, torch.float16, seed=1)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, residual, weight.float(), EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_references_compute_what_torch_and_hf_norms_compute(dtype: torch.dtype) -> None:
    # Bit for bit: the CPU engine's logits must stay exactly those of the unfused modules (and of HF).
    x, residual, weight, bias = make_norm_case(3, 96, dtype, seed=2, device="cpu")
    layer_norm = torch.nn.LayerNorm(96, eps=EPS).to(dtype)
    rms_norm = LlamaRMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        layer_norm.weight.copy_(weight)
        layer_norm.bias.copy_(bias)
        rms_norm.weight.copy_(weight)
        summed = residual + x  # the order the unfused blocks add in
        assert torch.equal(add_layer_norm_ref(x, residual, weight, bias, EPS)[1], layer_norm(summed))
        assert torch.equal(add_rms_norm_ref(x, residual, weight, EPS)[1], rms_norm(summed))


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
def test_it_runs_the_models_like_the_references(shape: str) -> None:
    model = load_model(f"random:{shape}").model.to(DEVICE)
    prompt = [464, 2068, 7586, 21831, 18045, 625, 262]
    want = forward_dense(model, prompt)
    model.context.backend = KernelBackend(add_layer_norm=add_layer_norm, add_rms_norm=add_rms_norm)
    torch.testing.assert_close(forward_dense(model, prompt), want, atol=1e-4, rtol=1e-4)


def test_it_offers_the_kernels_in_the_cuda_backend() -> None:
    from kernels.backend import cuda_backend

    backend = cuda_backend()
    assert backend.add_layer_norm is add_layer_norm and backend.add_rms_norm is add_rms_norm
    assert KernelBackend().add_layer_norm is add_layer_norm_ref
    assert KernelBackend().add_rms_norm is add_rms_norm_ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [768, 1600])  # GPT-2 124M and XL
@pytest.mark.parametrize("num_tokens", [1, 37, 512])
def test_it_matches_the_references_at_real_sizes(num_tokens: int, channels: int, dtype: torch.dtype) -> None:
    x, residual, weight, bias = make_norm_case(num_tokens, channels, dtype, seed=num_tokens, device="cuda")
    check_layer_norm(x, residual, weight, bias)
    check_rms_norm(x, residual, weight)
    check_layer_norm(x, None, weight, bias)
    assert torch.equal(add_layer_norm(x, residual, weight, bias, EPS)[0], x + residual)
