"""The engine's tokenizer: text <-> token ids, each token's raw bytes, special and end-of-sequence ids and the
chat template, loaded from an HF directory, a GGUF file, or GPT-2's BPE ranks through tiktoken."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from gpu_worker.errors import InvalidRequestError, ModelLoadError
from gpu_worker.loading.assets import gpt2_tiktoken_path, smollm2_gguf_path
from gpu_worker.tokenization import bpe
from gpu_worker.tokenization.chat_template import ChatTemplate


class _Backend(Protocol):
    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


# From this many characters an HF tokenizer encodes with the GIL released (~0.6 s a megabyte on a laptop CPU),
# so the web tier's worker thread for a large prompt leaves its event loop and other threads running.
GIL_FREE_ENCODE_CHARS = 16_384


class _TiktokenBackend:
    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.special_ids = frozenset(encoding.encode_single_token(t) for t in encoding.special_tokens_set)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # Special-token text in the input becomes the special token, as in HF tokenizers; GPT-2 adds no BOS.
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return self.encoding.decode(kept, errors="replace")


class _HFBackend:
    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch lets go of the GIL while it works; encode does not.
        if len(text) >= GIL_FREE_ENCODE_CHARS:
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class Tokenizer:
    """Text <-> ids for one model, plus what generation needs: token bytes, special ids, chat template."""

    def __init__(
        self,
        name: str,
        backend: _Backend,
        token_bytes: list[bytes],
        special_token_ids: frozenset[int],
        eos_token_ids: tuple[int, ...],
        bos_token_id: int | None,
        chat_template: ChatTemplate,
    ) -> None:
        self.name = name
        self._backend = backend
        self._bytes = token_bytes
        self.vocab_size = len(token_bytes)
        self.special_token_ids = special_token_ids
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self._texts: dict[bool, list[str | None]] = {}  # token_texts(), built on first use

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # ---- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Return the ids of text; special-token text in it becomes that token. BOS only if asked and used."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, not {type(text).__name__}", "prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can smuggle in a lone surrogate such as "\ud800"
            raise InvalidRequestError(
                f"text is not valid Unicode: {exc.reason} at index {exc.start}", "prompt"
            ) from exc
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Return the text of ids; bytes that are not valid UTF-8 become U+FFFD."""
        for i in ids:
            self._check_id(i)
        return self._backend.decode(list(ids), skip_special_tokens)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise InvalidRequestError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})", "tokens"
            )

    # ---- single tokens --------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes token_id stands for (a special token: its text's UTF-8)."""
        self._check_id(token_id)
        return self._bytes[token_id]

    def token_texts(self, skip_special_tokens: bool) -> list[str | None]:
        """Return each token's text when it is whole UTF-8 on its own ("" for a skipped special token), else
        None (its bytes start or end inside a character): the detokeniser's table for the common case."""
        texts = self._texts.get(skip_special_tokens)
        if texts is None:
            texts = []
            for token_id, raw in enumerate(self._bytes):
                if skip_special_tokens and token_id in self.special_token_ids:
                    texts.append("")
                    continue
                try:
                    texts.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    texts.append(None)
            self._texts[skip_special_tokens] = texts
        return texts

    def id_to_token(self, token_id: int) -> str:
        """Return a token's text as OpenAI's logprobs show it; bytes that are not UTF-8 read "bytes:\\xe2\\x80"."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Return the prompt text for a conversation; InvalidRequestError(param="messages") if it is bad."""
        return self.chat_template.render(messages, add_generation_prompt)

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Stop strings a chat request should add: non-empty only for the plain (GPT-2) template."""
        return self.chat_template.stop_strings

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def gpt2_fallback(cls, ranks_path: Path | None = None) -> Tokenizer:
        """Return GPT-2's tokenizer from its tiktoken ranks (default: the copy openai-whisper ships)."""
        if ranks_path is None:
            return _default_gpt2()
        ranks = bpe.load_gpt2_ranks(ranks_path)
        table = [b""] * (len(ranks) + 1)
        for raw, rank in ranks.items():
            table[rank] = raw
        eos = len(ranks)
        table[eos] = bpe.GPT2_EOS.encode()
        return cls(
            name="gpt2",
            backend=_TiktokenBackend(bpe.gpt2_encoding(ranks)),
            token_bytes=table,
            special_token_ids=frozenset({eos}),
            eos_token_ids=(eos,),
            bos_token_id=eos,  # GPT-2 uses <|endoftext|> for both, and adds neither on its own
            chat_template=ChatTemplate(None, bos_token=bpe.GPT2_EOS, eos_token=bpe.GPT2_EOS),
        )

    @classmethod
    def from_gguf(cls, path: Path) -> Tokenizer:
        """Return the tokenizer a GGUF file describes (read once per file and process, then cached)."""
        return _gguf_tokenizer(Path(path).resolve())

    @classmethod
    def from_hf(
        cls, name: str, tokenizer: HFTokenizer, config: dict[str, Any], eos_ids: Sequence[int] = ()
    ) -> Tokenizer:
        """Return a Tokenizer over a `tokenizers.Tokenizer`; config holds tokenizer_config.json's fields."""
        bos_id = _token_id(tokenizer, config.get("bos_token"))
        eos_id = _token_id(tokenizer, config.get("eos_token"))
        eos = tuple(dict.fromkeys([*([eos_id] if eos_id is not None else []), *eos_ids]))
        template = config.get("chat_template")
        return cls(
            name=name,
            backend=_HFBackend(tokenizer),
            token_bytes=_hf_token_bytes(tokenizer),
            special_token_ids=frozenset(
                i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
            ),
            eos_token_ids=eos,
            bos_token_id=bos_id,
            chat_template=ChatTemplate(
                template,
                bos_token=_token_text(config.get("bos_token")),
                eos_token=_token_text(config.get("eos_token")),
            ),
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Return the tokenizer of an HF model directory: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
        path = Path(path)
        config = _hf_tokenizer_config(path)
        if (path / "tokenizer.json").is_file():
            tokenizer = _load_tokenizer_json(path / "tokenizer.json")
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tokenizer = _load_vocab_merges(path, config)
        else:
            raise ModelLoadError(f"{path} has neither tokenizer.json nor vocab.json + merges.txt")
        return cls.from_hf(path.name, tokenizer, config, _generation_eos_ids(path))


# ---- HF directories ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _hf_tokenizer_config(path: Path) -> dict[str, Any]:
    """Return tokenizer_config.json over special_tokens_map.json, with the chat template resolved to one string."""
    config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (path / "chat_template.jinja").is_file():  # newer transformers save the template beside the config
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    config["chat_template"] = template if isinstance(template, str) else None
    return config


def _generation_eos_ids(path: Path) -> list[int]:
    """Return generation_config.json's eos_token_id(s): models such as Llama 3 end turns on several ids."""
    eos = _read_json(path / "generation_config.json").get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    return [i for i in eos if isinstance(i, int)] if isinstance(eos, list) else []


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for any malformed file
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc


def _load_vocab_merges(path: Path, config: dict[str, Any]) -> HFTokenizer:
    """Return GPT-2-style byte-level BPE from vocab.json + merges.txt, with its named special tokens added."""
    try:
        model = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
    except Exception as exc:  # tokenizers raises a bare Exception for any malformed file
        raise ModelLoadError(f"cannot load the BPE vocabulary in {path}: {exc}") from exc
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    names = {_token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    names.add(bpe.GPT2_EOS)
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens(
        [AddedToken(n, special=True, normalized=False) for n in sorted(names) if n in vocab]
    )
    return tokenizer


def _token_text(entry: Any) -> str:
    """Return a special token's text from a config entry, which is a string or {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else ""


def _token_id(tokenizer: HFTokenizer, entry: Any) -> int | None:
    text = _token_text(entry)
    return tokenizer.token_to_id(text) if text else None


def _is_byte_level(tokenizer: HFTokenizer) -> bool:
    """Return whether the tokenizer spells bytes in GPT-2's alphabet (its decoder is, or contains, ByteLevel)."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    return '"ByteLevel"' in json.dumps(decoder)


def _sentencepiece_bytes(token: str) -> bytes:
    """Return the bytes of a SentencePiece-style token: "<0x0A>" is one raw byte, "▁" a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode()


def _hf_token_bytes(tokenizer: HFTokenizer) -> list[bytes]:
    """Return every id's raw bytes: added tokens are literal text, model tokens are spelled per the decoder."""
    spell = bpe.unspell if _is_byte_level(tokenizer) else _sentencepiece_bytes
    table = [b""] * tokenizer.get_vocab_size(with_added_tokens=True)
    for token, i in tokenizer.get_vocab(with_added_tokens=False).items():
        table[i] = spell(token)
    for i, added in tokenizer.get_added_tokens_decoder().items():
        table[i] = added.content.encode()
    return table


# ---- cached loaders ---------------------------------------------------------------------------------


@cache
def _default_gpt2() -> Tokenizer:
    return Tokenizer.gpt2_fallback(gpt2_tiktoken_path())


@cache
def _gguf_tokenizer(path: Path) -> Tokenizer:
    # Reading a GGUF's metadata maps the whole (often 100 MB+) file and takes seconds: once per process.
    vocab = bpe.read_gguf_vocab(path)
    tokenizer = bpe.build_gguf_tokenizer(vocab)

    def text(i: int | None) -> str:
        return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else ""

    eos = vocab.eos_token_ids[0] if vocab.eos_token_ids else None
    config = {
        "bos_token": text(vocab.bos_token_id),
        "eos_token": text(eos),
        "chat_template": vocab.chat_template,
    }
    return Tokenizer.from_hf(f"gguf:{path.name}", tokenizer, config, vocab.eos_token_ids)


def load_tokenizer(source_kind: str, source_path: Path | None, arch: str) -> Tokenizer:
    """Return the tokenizer for a model the loader found: "hf_dir", "gguf", or "random" (synthetic weights)."""
    if source_kind == "hf_dir" and source_path is not None:
        has_files = (source_path / "tokenizer.json").is_file() or (source_path / "vocab.json").is_file()
        if has_files or arch != "gpt2":
            return Tokenizer.from_hf_dir(source_path)
        return Tokenizer.gpt2_fallback()
    if source_kind == "gguf" and source_path is not None:
        return Tokenizer.from_gguf(source_path)
    if source_kind == "random":
        if arch == "gpt2":
            return Tokenizer.gpt2_fallback()
        if arch in ("llama", "qwen2"):  # the random Llama-family shapes speak SmolLM2's vocabulary
            return Tokenizer.from_gguf(smollm2_gguf_path())
    raise ModelLoadError(f"no tokenizer for source {source_kind!r} (path {source_path}, arch {arch!r})")
