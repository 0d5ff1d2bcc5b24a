"""GGUF tokenizers with the "llama-bpe" (Llama 3) and "qwen2" pre-tokenizers against transformers' tokenizers
built from the same vocabulary and merges (a byte-level BPE trained in the test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from gpu_worker.tokenization.bpe import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN, TOKEN_TYPE_CONTROL
from gpu_worker.tokenization.tokenizer import Tokenizer as RuvonTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'LL say it's 2024, they'VE 1234567 apples!",
    "Numbers: 1 22 333 4444 55555 and 3.14159; prices $19.99, 100% sure.\n\nNew paragraph\r\n\tindented",
    "Ruvon serves language models to many tenants at once, on one GPU or many. Caf\u00e9s na\u00efve r\u00e9sum\u00e9.",
    "def f(x):\n    return x ** 2  # squares\n\n\nclass A:\n    pass\n",
    "\u4f60\u597d\u4e16\u754c\uff0c\u8bed\u8a00\u6a21\u578b\u3002 \U0001f642 \u0645\u0631\u062d\u0628\u0627 \u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
]
PROBES = [
    *CORPUS,
    "I'm sure we'd've DON'T won't",
    "   leading and trailing spaces   ",
    "x  1\t\t7 12345678901",
    "e\u0301 cafe\u0301 (decomposed accents)",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a\n\n\n b \r\n\r\n c!!!\n",
]


def _train(pattern: str) -> Tokenizer:
    """Return a byte-level BPE trained on CORPUS with this split: a real-looking vocabulary and merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def _vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    spec: dict[str, Any] = json.loads(tok.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, merges


def _write_gguf(path: Path, arch: str, pre: str, tokens: list[str], merges: list[str]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_TYPE_CONTROL if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[RuvonTokenizer, Any]:
    tokens, merges = _vocab_and_merges(_train(QWEN2_SPLIT_PATTERN))
    path = _write_gguf(tmp_path_factory.mktemp("qwen2") / "qwen2.gguf", "qwen2", "qwen2", tokens, merges)
    reference = transformers.Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]
    )
    reference.add_special_tokens({"additional_special_tokens": SPECIALS})
    return RuvonTokenizer.from_gguf(path), reference


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[RuvonTokenizer, Any]:
    tokens, merges = _vocab_and_merges(_train(LLAMA3_SPLIT_PATTERN))
    path = _write_gguf(
        tmp_path_factory.mktemp("llama3") / "llama3.gguf", "llama", "llama-bpe", tokens, merges
    )
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return RuvonTokenizer.from_gguf(path), reference


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_it_encodes_like_transformers(family: str, request: pytest.FixtureRequest) -> None:
    ours, reference = request.getfixturevalue(family)
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids)


def test_it_splits_digits_by_family(
    qwen2: tuple[RuvonTokenizer, Any], llama3: tuple[RuvonTokenizer, Any]
) -> None:
    # Qwen2 gives every digit its own piece; Llama 3 groups up to three (so 7 digits are 3 pieces).
    assert len(qwen2[0].encode("1234567")) == 7
    assert [llama3[0].token_bytes(i) for i in llama3[0].encode("1234567")][-1] == b"7"
    assert len(llama3[0].encode("1234567")) <= 3


def test_it_normalises_qwen2_text_to_nfc(qwen2: tuple[RuvonTokenizer, Any]) -> None:
    ours, _ = qwen2
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")
