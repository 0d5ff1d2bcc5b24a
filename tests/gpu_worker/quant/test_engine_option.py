"""--quantization reaches the engine from the one option table, and the model label says what runs."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine_args import add_engine_arguments, engine_config


def _parse(argv: list[str]) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_config(vars(parser.parse_args(argv)))


def test_it_takes_the_option_and_its_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse([]).quantization == "auto"
    assert _parse(["--quantization", "int4-g32"]).quantization == "int4-g32"
    assert _parse(["--quantization", "bnb-nf4"]).quantization == "bnb-nf4"  # parsed; checked when loading
    monkeypatch.setenv("RUVON_QUANTIZATION", "int8")
    assert _parse([]).quantization == "int8"
    with pytest.raises(SystemExit):
        _parse(["--quantization", "int5"])


def test_an_engine_generates_with_a_quantised_model_and_labels_it() -> None:
    engine = LLMEngine(EngineConfig(model="random:tiny-llama", quantization="int4-g32", num_blocks=32))
    assert engine.label == "tiny-llama (RANDOM weights, seed 0, int4 g32 at load)"
    out = engine.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids[0]) == 4


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_an_engine_generates_with_a_bitsandbytes_model_and_labels_it() -> None:
    engine = LLMEngine(EngineConfig(model="random:tiny", quantization="bnb-int8", num_blocks=32))
    assert engine.label == "tiny (RANDOM weights, seed 0, bnb int8 per-channel (LLM.int8) at load)"
    out = engine.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids[0]) == 4


def test_the_embedding_option_takes_its_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse([]).quantize_embeddings is False
    assert _parse(["--quantize-embeddings"]).quantize_embeddings is True
    monkeypatch.setenv("RUVON_QUANTIZE_EMBEDDINGS", "1")
    assert _parse([]).quantize_embeddings is True
