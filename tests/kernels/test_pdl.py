"""kernels/pdl.py: which launches ask for programmatic dependent launch (the GPU side is in
tests/gpu_worker/engine/test_gpu.py, which compares every token and logprob with it on and off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import pdl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_flags():
    pdl._enabled.cache_clear()
    yield
    pdl._enabled.cache_clear()


def test_cpu_tensors_launch_without_it() -> None:
    assert pdl.pdl_args(torch.device("cpu")) == {"USE_PDL": False}


@pytest.mark.parametrize(
    ("ruvon_pdl", "interpret"), [("0", "0"), ("1", "1")], ids=["turned-off", "interpreted"]
)
def test_it_stays_off_when_turned_off_or_interpreted_even_for_a_cuda_device(
    monkeypatch: pytest.MonkeyPatch, ruvon_pdl: str, interpret: str
) -> None:
    monkeypatch.setenv("RUVON_PDL", ruvon_pdl)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    # Decided before any CUDA call: this machine may have no GPU at all.
    assert pdl.pdl_args(torch.device("cuda", 0)) == {"USE_PDL": False}


COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.norm import _add_norm_kernel

use_pdl = sys.argv[1] == "1"
pointers = ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "new_residual_ptr", "out_ptr")
strides = ("stride_x", "stride_residual", "stride_new_residual", "stride_out")
constexprs = {"C": 1600, "BLOCK": 2048, "HAS_RESIDUAL": True, "IS_RMS": False, "USE_PDL": use_pdl}
signature = {name: "*fp16" for name in pointers} | {name: "i32" for name in strides} | {"eps": "fp32"}
signature |= {name: "constexpr" for name in constexprs}
source = ASTSource(_add_norm_kernel, signature, constexprs=constexprs)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
"""


@pytest.mark.parametrize("use_pdl", [True, False])
def test_a_kernel_compiled_for_hopper_waits_for_the_previous_one_only_with_it(use_pdl: bool) -> None:
    # The fused add + norm compiled for sm_90 without a GPU (Triton's compiler and ptxas, in a process of its
    # own, as this one's kernels are interpreted): its PTX holds the wait and the release exactly when
    # USE_PDL is set.
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    ptx = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER, "1" if use_pdl else "0"],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert ".target sm_90" in ptx
    assert ("griddepcontrol.wait" in ptx) is use_pdl
    assert ("griddepcontrol.launch_dependents" in ptx) is use_pdl
