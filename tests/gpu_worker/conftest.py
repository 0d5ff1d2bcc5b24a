"""Shared fixtures: random-weight HF models saved to disk, so our engine and HF load the same weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.loading.assets import smollm2_gguf_path
from gpu_worker.loading.loader import random_hf_config
from gpu_worker.tokenization.tokenizer import Tokenizer


@dataclass
class Peer:
    """An HF transformers model and the directory holding its weights."""

    path: Path
    model: transformers.PreTrainedModel

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Return HF generate()'s greedy continuation (EOS ignored)."""
        ids = torch.tensor([prompt_ids])
        config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0
        )
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, len(prompt_ids) :].tolist()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([token_ids])).logits[0].float()


def make_peer(shape: str, root: Path, seed: int = 0) -> Peer:
    config = random_hf_config(shape)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    path = root / shape
    model.save_pretrained(path)
    if config.model_type in ("llama", "qwen2"):
        save_smollm2_tokenizer(path)
    return Peer(path, model)


def save_smollm2_tokenizer(path: Path) -> None:
    """Give a model directory SmolLM2's tokenizer.json: the Llama-family random shapes speak its vocabulary."""
    Tokenizer.from_gguf(smollm2_gguf_path())._backend.tokenizer.save(str(path / "tokenizer.json"))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def gpt2() -> Tokenizer:
    """GPT-2's tokenizer from the shipped BPE ranks."""
    return Tokenizer.gpt2_fallback()


@pytest.fixture(scope="session")
def smol() -> Tokenizer:
    """SmolLM2's tokenizer from the shipped GGUF."""
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer("tiny-llama", tmp_path_factory.mktemp("models"))


def engine_for(peer: Peer, **overrides: object) -> LLMEngine:
    settings: dict[str, object] = {
        "model": str(peer.path),
        "device": "cpu",
        "dtype": "float32",
        "num_blocks": 64,
    }
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))  # type: ignore[arg-type]
