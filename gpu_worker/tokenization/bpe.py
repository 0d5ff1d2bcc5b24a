"""Byte-level BPE vocabularies: GPT-2's byte alphabet and split regex, GPT-2's tiktoken ranks (checked
against their sha256), and a `tokenizers` BPE rebuilt from a GGUF file's tokenizer metadata."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from gpu_worker.errors import ModelLoadError
from gpu_worker.loading.assets import GPT2_TIKTOKEN_SHA256
from gpu_worker.loading.gguf_reader import GGUFFile

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs (each may take one leading
# space), then whitespace. BPE merges never cross the boundaries of these pieces.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS = "<|endoftext|>"
# Llama 3's split (GGUF pre "llama-bpe"): contractions in any case, a letter run that may take one leading
# non-letter, digit runs of up to three, punctuation runs that keep trailing newlines, then whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's (GGUF pre "qwen2"): the same, but every digit alone.
QWEN2_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# llama.cpp's token_type values (gguf.TokenType); CONTROL tokens are the special ones.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _byte_alphabet() -> dict[int, str]:
    """Return GPT-2's map from each byte to a printable character that spells it inside a vocabulary."""
    # Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft hyphen) are
    # shifted to U+0100 onwards, so every token is a visible string with no whitespace in it.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in keep)
    alphabet = {b: chr(b) for b in keep}
    alphabet.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return alphabet


BYTE_TO_CHAR: dict[int, str] = _byte_alphabet()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}


def spell_bytes(raw: bytes) -> str:
    """Return raw bytes written in the byte-level alphabet (b" hi" -> "Ġhi")."""
    return "".join(BYTE_TO_CHAR[b] for b in raw)


def unspell(token: str) -> bytes:
    """Return the bytes a byte-level token spells; characters outside the alphabet stand for their UTF-8."""
    return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode() for c in token)


# ---- GPT-2 through tiktoken -------------------------------------------------------------------------


def load_gpt2_ranks(path: Path) -> dict[bytes, int]:
    """Return GPT-2's BPE ranks from a tiktoken file ("<base64 token> <rank>" lines), checked by sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read GPT-2 BPE ranks at {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_TIKTOKEN_SHA256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {GPT2_TIKTOKEN_SHA256}: refusing to use it"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """Return a tiktoken Encoding of GPT-2 built from local ranks (tiktoken.get_encoding would download)."""
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={GPT2_EOS: len(ranks)}
    )


# ---- GGUF -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes, as llama.cpp's `tokenizer.*` metadata keys spell it."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool
    chat_template: str | None


def read_gguf_vocab(path: Path) -> GGUFVocab:
    """Return the tokenizer metadata of a GGUF file; raise ModelLoadError if it is unreadable or incomplete."""
    try:
        reader = GGUFFile(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    meta: dict[str, Any] = {
        key: value for key, value in reader.fields.items() if key.startswith("tokenizer.")
    }
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    # End-of-generation tokens: llama.cpp stops on eos, and on eot/eom where a file names them.
    eos = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return GGUFVocab(
        model=meta.get("tokenizer.ggml.model", ""),
        pre=meta.get("tokenizer.ggml.pre", "default"),
        tokens=tokens,
        token_types=list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens))),
        merges=list(meta.get("tokenizer.ggml.merges", [])),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), _byte_level(use_regex=False)]
    )


# `tokenizer.ggml.pre` -> the pre-tokenizer llama.cpp applies for it. "smollm" isolates every digit before
# GPT-2's split, as SmolLM2's own tokenizer.json (Digits, then ByteLevel) and llama.cpp both do;
# transformers' GGUF converter uses GPT-2's split alone there, which differs only where whitespace runs meet
# digits ("x  1", "\\t\\t7"). "llama-bpe" and "qwen2" split as Llama 3's and Qwen2's tokenizer.json do.
GGUF_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": lambda: _byte_level(use_regex=True),
    "gpt2": lambda: _byte_level(use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level(use_regex=True)]
    ),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_SPLIT_PATTERN),
    "qwen2": lambda: _split_then_bytes(QWEN2_SPLIT_PATTERN),
}
# Llama 3 (in llama.cpp and its tokenizer.json) takes a piece that is itself in the vocabulary whole, merges
# or not; Qwen2's tokenizer NFC-normalises text first.
IGNORE_MERGES_PRES = frozenset({"llama-bpe"})
NFC_PRES = frozenset({"qwen2"})


def gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Return the pre-tokenizer that llama.cpp applies for a `tokenizer.ggml.pre` value."""
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ModelLoadError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(map(repr, GGUF_PRE_TOKENIZERS))}"
        )
    return GGUF_PRE_TOKENIZERS[pre]()


def _vocab_entries(tokens: list[str]) -> dict[str, int]:
    """Return token -> id; a token spelled outside the byte alphabet is respelled from its UTF-8 bytes."""
    alphabet = CHAR_TO_BYTE.keys()
    return {t if set(t) <= alphabet else spell_bytes(t.encode()): i for i, t in enumerate(tokens)}


def _added_tokens(vocab: GGUFVocab, spelled: dict[str, int], kind: int) -> list[AddedToken]:
    """Return the tokens of one token_type as added tokens, so that text containing them matches them whole.

    Only tokens present in the vocabulary under their own spelling qualify: adding any other string would give
    it a new id past the end of the model's embedding.
    """
    return [
        AddedToken(token, special=kind == TOKEN_TYPE_CONTROL, normalized=False)
        for token, token_type in zip(vocab.tokens, vocab.token_types, strict=True)
        if token_type == kind and token in spelled
    ]


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ModelLoadError(f"GGUF merge {merge!r} is not two tokens separated by a space")
    return left, right


def build_gguf_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """Return a byte-level BPE `tokenizers.Tokenizer` equivalent to the one the GGUF file describes."""
    if vocab.model != "gpt2":
        raise ModelLoadError(
            f"GGUF tokenizer model {vocab.model!r} is not supported; only byte-level BPE ('gpt2')"
        )
    spelled = _vocab_entries(vocab.tokens)
    merges = [_merge_pair(m) for m in vocab.merges]
    tok = Tokenizer(models.BPE(vocab=spelled, merges=merges, ignore_merges=vocab.pre in IGNORE_MERGES_PRES))
    tok.pre_tokenizer = gguf_pre_tokenizer(vocab.pre)
    if vocab.pre in NFC_PRES:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_added_tokens(vocab, spelled, TOKEN_TYPE_CONTROL))
    tok.add_tokens(_added_tokens(vocab, spelled, TOKEN_TYPE_USER_DEFINED))
    if vocab.add_bos_token and vocab.bos_token_id is not None:
        bos = (vocab.tokens[vocab.bos_token_id], vocab.bos_token_id)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    return tok
