"""Int8Linear / Int4Linear: equal to F.linear over their own dequantised weights; shards, bias, GELU, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import QuantizedTensor
from gpu_worker.layers.context import ForwardContext
from gpu_worker.quant.layers import Int4Linear, Int8Linear, QuantLinear
from gpu_worker.quant.quantizers import dequantize, quantize_int4, quantize_int8
from kernels.backend import KernelBackend, cpu_backend

SHARDS = {"q_proj": 64, "k_proj": 32, "v_proj": 32}


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def _expected(
    layer: QuantLinear, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if layer.bits == 8:
        q, scales = quantize_int8(weight, None if layer.group_size == layer.in_features else layer.group_size)
        w = dequantize(q, scales, None)
    else:
        w = dequantize(*quantize_int4(weight, layer.group_size), layer.group_size)
    out = F.linear(x, w, bias)
    return F.gelu(out, approximate="tanh") if layer.gelu else out


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    ("cls", "group"),
    [(Int8Linear, None), (Int8Linear, 32), (Int4Linear, 32), (Int4Linear, 64), (Int4Linear, 128)],
)
@pytest.mark.parametrize(("backend", "tolerance"), [(KernelBackend(), 1e-6), (cpu_backend(), 1e-2)])
def test_it_equals_f_linear_over_its_dequantised_weights(
    cls: type[QuantLinear], group: int | None, backend: KernelBackend, tolerance: float
) -> None:
    # The references are exact in fp32; the CPU backend's torch ops run in bf16 (kernels/quant_cpu.py).
    context = ForwardContext()
    context.backend = backend
    layer = cls(context, 256, {"": 48}, group, bias=True, gelu=True)
    weight, bias, x = _weights(48, 256), torch.randn(48), torch.randn(5, 256)
    with torch.no_grad():
        layer.load_weight("weight", weight)
        layer.load_weight("bias", bias)
        out = layer(x)
    assert out.shape == (5, 48) and out.dtype == torch.float32
    assert _relative_error(out, _expected(layer, weight, x, bias)) < tolerance
    # ... and close to the unquantised layer: int8 much closer than int4.
    loose = 0.01 if cls is Int8Linear else 0.15
    assert _relative_error(out, F.gelu(F.linear(x, weight, bias), approximate="tanh")) < loose


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_it_fills_merged_shards_in_any_order(cls: type[QuantLinear]) -> None:
    context = ForwardContext()
    layer = cls(context, 64, SHARDS, 32)
    parts = {name: _weights(rows, 64, seed=i) for i, (name, rows) in enumerate(SHARDS.items())}
    with torch.no_grad():
        for name in ["v_proj", "q_proj", "k_proj"]:
            layer.load_weight(f"{name}.weight", parts[name])
        x = torch.randn(3, 64)
        out = layer(x)
    whole = torch.cat(list(parts.values()))
    assert _relative_error(out, _expected(layer, whole, x, None)) < 1e-6


def test_it_packs_int4_only_when_every_shard_has_arrived() -> None:
    layer = Int4Linear(ForwardContext(), 64, SHARDS, 32)
    layer.qscales.data.fill_(float("nan"))  # what the loader does first
    with torch.no_grad():
        layer.load_weight("q_proj.weight", _weights(64, 64))
        layer.load_weight("k_proj.weight", _weights(32, 64))
    assert layer.qscales.isnan().all()  # a shard short: the loader's NaN check catches the missing v_proj
    with torch.no_grad():
        layer.load_weight("v_proj.weight", _weights(32, 64))
    assert not layer.qscales.isnan().any()


def test_it_takes_an_already_quantised_tensor_as_it_is() -> None:
    q, scales, mins = quantize_int4(_weights(48, 64), 32)
    layer = Int4Linear(ForwardContext(), 64, {"": 48}, 32)
    with torch.no_grad():
        layer.load_weight("weight", QuantizedTensor(4, q, scales, mins, "Q4_1"))
        x = torch.randn(2, 64)
        assert torch.allclose(layer(x), F.linear(x, dequantize(q, scales, mins)), atol=1e-5)


def test_it_refuses_a_quantised_tensor_of_another_layout() -> None:
    q, scales = quantize_int8(_weights(48, 64), 32)
    layer = Int4Linear(ForwardContext(), 64, {"": 48}, 32)
    with pytest.raises(ModelLoadError, match=r"Q8_0 \(int8 g32\).*int4 g32"):
        layer.load_weight("weight", QuantizedTensor(8, q, scales, None, "Q8_0"))


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("weight", (48, 32), "has shape"),
        ("gate.weight", (48, 64), "is not one of"),
        ("bias", (48,), "is not one of"),
    ],
)
def test_it_names_a_bad_checkpoint_tensor(name: str, shape: tuple[int, ...], message: str) -> None:
    layer = Int8Linear(ForwardContext(), 64, {"": 48}, None)  # no bias
    with pytest.raises(ModelLoadError, match=message):
        layer.load_weight(name, torch.zeros(shape))


@pytest.mark.parametrize(("k", "group"), [(576, 128), (200, 64), (97, 32)])  # SmolLM2's width; odd K
@pytest.mark.parametrize(("backend", "tolerance"), [(KernelBackend(), 1e-6), (cpu_backend(), 1e-2)])
def test_it_takes_a_shorter_last_group_when_the_group_does_not_divide_k(
    k: int, group: int, backend: KernelBackend, tolerance: float
) -> None:
    context = ForwardContext()
    context.backend = backend
    layer = Int4Linear(context, k, {"gate_proj": 32, "up_proj": 16}, group, bias=True)
    weight, x = _weights(48, k), torch.randn(3, k)
    with torch.no_grad():
        layer.load_weight("up_proj.weight", weight[32:])
        layer.load_weight("gate_proj.weight", weight[:32])
        layer.load_weight("bias", torch.ones(48))
        out = layer(x)
    groups = -(-k // group)
    assert layer.padded_in == groups * group and layer.qweight.shape == (48, groups * group // 2)
    assert _relative_error(out, _expected(layer, weight, x, torch.ones(48))) < tolerance
    assert _relative_error(out, F.linear(x, weight, torch.ones(48))) < 0.15


def test_it_gives_the_short_last_group_its_own_range() -> None:
    # A last group of 8 small weights after a group of huge ones: its scale comes from its own 8 weights.
    weight = torch.cat([torch.full((2, 32), 100.0), torch.linspace(-1, 1, 8).repeat(2, 1)], dim=1)
    q, scales, mins = quantize_int4(weight, 32)
    assert q.shape == (2, 40) and scales.shape == (2, 2)
    assert torch.allclose(scales[:, 1], torch.full((2,), 2 / 15)) and torch.equal(
        mins[:, 1], torch.full((2,), -1.0)
    )
    assert (dequantize(q, scales, mins, 32) - weight).abs().max() <= 1 / 15 + 1e-6  # half a step


def test_the_triton_gemv_reads_the_padded_layout_unchanged() -> None:
    # The kernel's signature is whole groups: a ragged layer hands it its padded rows and x padded with zeros.
    pytest.importorskip("triton")
    from kernels.quant_linear import int4_gemv

    layer = Int4Linear(ForwardContext(), 200, {"": 20}, 64, bias=True, gelu=True)  # reference layout
    with torch.no_grad():
        layer.load_weight("weight", _weights(20, 200))
        layer.load_weight("bias", torch.randn(20))
        x = torch.randn(3, 200)
        ref = layer(x)
        out = int4_gemv(F.pad(x, (0, layer.padded_in - 200)), layer.qweight, layer.qscales, layer.bias, True)
    assert _relative_error(out, ref) < 1e-5


def test_it_refuses_an_int8_group_that_does_not_divide_the_width() -> None:
    with pytest.raises(ModelLoadError, match="int8 group size 32 does not divide in_features 100"):
        Int8Linear(ForwardContext(), 100, {"": 16}, 32)


def test_it_refuses_to_run_under_another_backend_than_it_was_packed_for() -> None:
    context = ForwardContext()
    context.backend = cpu_backend()
    layer = Int4Linear(context, 64, {"": 48}, 32)
    with torch.no_grad():
        layer.load_weight("weight", _weights(48, 64))
    context.backend = KernelBackend()
    with pytest.raises(RuntimeError, match="packed for another kernel backend"):
        layer(torch.randn(1, 64))
