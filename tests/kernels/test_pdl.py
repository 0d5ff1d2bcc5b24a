"""kernels/pdl.py: which launches ask for programmatic dependent launch (the GPU side is in
tests/gpu_worker/engine/test_gpu.py, which compares every token and logprob with it on and off)."""

from __future__ import annotations

import pytest
import torch

from kernels import pdl


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
