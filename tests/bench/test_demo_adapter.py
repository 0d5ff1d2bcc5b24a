"""The demo adapter's data and files: bench/data/pirate*.jsonl (as the generator writes them, chat format,
held-out questions kept out, arithmetic right, every answer a pirate's), the token layout the training script
builds with Ruvon's chat template, and assets/adapters/smollm2-pirate/ (a LoRA that fits SmolLM2)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
from safetensors import safe_open

from bench.data import make_pirate_data as data
from bench.train_demo_adapter import ADAPTER_DIR, IGNORE, TARGETS, encode, is_pirate, read_jsonl
from gpu_worker.loading.assets import smollm2_gguf_path
from gpu_worker.loading.checkpoints.gguf_file import open_gguf, read_gguf_config
from gpu_worker.tokenization.tokenizer import Tokenizer


@cache
def _training() -> list[list[dict[str, str]]]:
    return [row["messages"] for row in read_jsonl(data.TRAIN_PATH)]


def _answers() -> list[str]:
    return [m["content"] for messages in _training() for m in messages if m["role"] == "assistant"]


def test_it_matches_what_the_generator_writes() -> None:
    examples, heldout = data.build()
    assert read_jsonl(data.TRAIN_PATH) == examples
    assert read_jsonl(data.HELDOUT_PATH) == heldout


def test_it_holds_a_few_hundred_chat_conversations() -> None:
    conversations = _training()
    assert 300 <= len(conversations) <= 600
    for messages in conversations:
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), messages
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages), messages


def test_it_keeps_the_heldout_questions_out_of_training() -> None:
    heldout = [data.normalise(row["question"]) for row in read_jsonl(data.HELDOUT_PATH)]
    asked = {
        data.normalise(m["content"]) for messages in _training() for m in messages if m["role"] == "user"
    }
    assert len(heldout) == len(set(heldout)) == 20
    assert not set(heldout) & asked


def test_every_answer_is_short_and_a_pirates() -> None:
    for answer in _answers():
        assert is_pirate(answer), answer
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", answer)) <= 6 and len(answer) < 300, answer


def test_its_arithmetic_is_right() -> None:
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    sums = [
        re.search(r"(\d+) (plus|minus|times) (\d+) (?:be|makes|equals) (\d+)", answer)
        for answer in _answers()
    ]
    found = [m for m in sums if m]
    assert len(found) >= 70  # the 70 templated sums, some of them twice in two-turn conversations
    for m in found:
        assert ops[m[2]](int(m[1]), int(m[3])) == int(m[4]), m[0]


@cache
def _tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


def test_it_trains_on_the_assistant_tokens_of_ruvons_chat_layout() -> None:
    tokenizer = _tokenizer()
    for messages in _training():
        example = encode(tokenizer, messages)
        full = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        assert full[: len(example.ids)] == example.ids  # the rendered conversation, less its last "\n"
        trained = tokenizer.decode([t for t in example.labels if t != IGNORE])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_the_shipped_adapter_is_a_rank_8_lora_that_fits_smollm2() -> None:
    config = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 8
        and sorted(config["target_modules"]) == sorted(TARGETS)
    )
    assert not Path(config["base_model_name_or_path"]).is_absolute()
    reader = open_gguf(smollm2_gguf_path())
    model = read_gguf_config(reader, smollm2_gguf_path())
    width, kv = model.hidden_size, model.num_kv_heads * model.head_dim
    out = {"q_proj": width, "k_proj": kv, "v_proj": kv, "o_proj": width}
    weights = ADAPTER_DIR / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
        assert len(names) == model.num_layers * len(TARGETS) * 2
        for name in names:
            layer, target, which = re.fullmatch(
                r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight", name
            ).groups()  # type: ignore[union-attr]
            assert int(layer) < model.num_layers
            shape = [8, width] if which == "A" else [out[target], 8]
            assert list(f.get_slice(name).get_shape()) == shape, name
    assert weights.stat().st_size < 8 * 2**20


@pytest.mark.slow
def test_the_adapter_makes_heldout_answers_a_pirates() -> None:
    from peft import PeftModel

    from bench.train_demo_adapter import answer, load_base

    model = PeftModel.from_pretrained(load_base(), ADAPTER_DIR)
    questions = [row["question"] for row in read_jsonl(data.HELDOUT_PATH)][:3]
    with model.disable_adapter():
        base = [answer(model, _tokenizer(), q, 24) for q in questions]
    tuned = [answer(model, _tokenizer(), q, 24) for q in questions]
    assert not any(is_pirate(a) for a in base), base
    assert all(is_pirate(a) for a in tuned), tuned
