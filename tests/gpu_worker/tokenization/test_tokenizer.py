"""Tokenizer: GPT-2 via tiktoken, SmolLM2's GGUF tokenizer against transformers', HF directories, chat templates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.errors import InvalidRequestError, ModelLoadError
from gpu_worker.loading.assets import gpt2_tiktoken_path, smollm2_gguf_path
from gpu_worker.tokenization.bpe import BYTE_TO_CHAR, TOKEN_TYPE_CONTROL, load_gpt2_ranks
from gpu_worker.tokenization.chat_template import ChatTemplate
from gpu_worker.tokenization.tokenizer import GIL_FREE_ENCODE_CHARS, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def hf_smol() -> Any:
    """transformers' own tokenizer for the same GGUF file: the reference our ids must match."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---- GPT-2 (tiktoken) ---------------------------------------------------------------------------------


def test_it_encodes_hello_world_as_gpt2_does(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_token_ids == (50256,)
    assert gpt2.special_token_ids == frozenset({50256})


@pytest.mark.parametrize(
    "text", ["Hi 😀 there 👍🏽", "你好，世界！日本語のテキスト", "naïve café — “quotes” … ½"]
)
def test_it_round_trips_emoji_and_cjk_with_gpt2(gpt2: Tokenizer, text: str) -> None:
    ids = gpt2.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters take several byte tokens
    assert gpt2.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_it_round_trips_any_unicode_with_gpt2(gpt2: Tokenizer, text: str) -> None:
    assert gpt2.decode(gpt2.encode(text)) == text


def test_it_encodes_special_token_text_as_the_special_token(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("end<|endoftext|>start")
    assert 50256 in ids
    assert gpt2.decode(ids) == "end<|endoftext|>start"
    assert gpt2.decode(ids, skip_special_tokens=True) == "endstart"


def test_it_gives_token_bytes_and_openai_token_strings(gpt2: Tokenizer) -> None:
    assert gpt2.id_to_token(15496) == "Hello"
    assert gpt2.id_to_token(995) == " world"
    assert gpt2.token_bytes(995) == b" world"
    assert gpt2.token_bytes(50256) == b"<|endoftext|>"
    first, *_ = gpt2.encode("😀")  # the emoji's first token holds an unfinished UTF-8 sequence
    assert gpt2.token_bytes(first) == "😀".encode()[: len(gpt2.token_bytes(first))]
    assert gpt2.id_to_token(first) == "bytes:" + "".join(f"\\x{b:02x}" for b in gpt2.token_bytes(first))


def test_it_rejects_ids_outside_the_vocabulary(gpt2: Tokenizer) -> None:
    for bad in (-1, 50257):
        with pytest.raises(InvalidRequestError) as err:
            gpt2.decode([15496, bad])
        assert err.value.param == "tokens"
    with pytest.raises(InvalidRequestError):
        gpt2.token_bytes(10**6)


def test_it_rejects_text_that_is_not_valid_unicode(gpt2: Tokenizer, smol: Tokenizer) -> None:
    for tokenizer in (gpt2, smol):
        with pytest.raises(InvalidRequestError, match="index 3") as err:
            tokenizer.encode("abc\ud800def")
        assert err.value.param == "prompt"
        with pytest.raises(InvalidRequestError):
            tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_it_refuses_tampered_gpt2_ranks(tmp_path: Path) -> None:
    tampered = tmp_path / "gpt2.tiktoken"
    shutil.copy(gpt2_tiktoken_path(), tampered)
    data = bytearray(tampered.read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")  # change the last rank's digit
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        Tokenizer.gpt2_fallback(tampered)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_gpt2_ranks(tmp_path / "missing.tiktoken")
    assert len(load_gpt2_ranks(gpt2_tiktoken_path())) == 50256


# ---- SmolLM2's GGUF tokenizer ------------------------------------------------------------------------

VARIED = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\nnewlines\n\nand\r\nCRLF",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "pi is 3.14159, the date 2024-01-01, a million 1,000,000",
    "call 555-0100 or +44 20 7946 0958",
    "Ünïcödé çäfé naïve résumé",
    "你好，世界！",
    "こんにちは、世界。カタカナ",
    "Привет, мир! Ελληνικά",
    "emoji 😀👍🏽 family 👩‍👩‍👧 flags 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|endoftext|>special<file_sep>tokens",
    "I'm sure you'll've done it, they'd said",
    "https://example.com/path?q=1&r=two#frag",
    "    \n\t  \r\n   ",
    "a" * 40 + " " + "xyz" * 12,
]


@pytest.mark.parametrize("text", VARIED)
def test_it_matches_transformers_gguf_tokenizer(smol: Tokenizer, hf_smol: Any, text: str) -> None:
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(smol.encode(text)) == text


def test_it_encodes_a_long_text_as_transformers_does(smol: Tokenizer, hf_smol: Any) -> None:
    # From GIL_FREE_ENCODE_CHARS on, the GGUF tokenizer encodes through encode_batch (it lets go of the GIL,
    # so the web tier's worker thread leaves its event loop running): the same ids as below the threshold.
    text = "".join(VARIED) * (GIL_FREE_ENCODE_CHARS // len("".join(VARIED)) + 1)
    assert len(text) >= GIL_FREE_ENCODE_CHARS
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", ["x  1", "   42", "\t\t7", "a\n\n  3", "col1    col2\n1       2"])
def test_it_isolates_digits_like_llama_cpp_for_smollm(smol: Tokenizer, hf_smol: Any, text: str) -> None:
    # SmolLM2 was trained with every digit split off first (llama.cpp's "smollm" pre-tokenizer); transformers'
    # GGUF converter ignores "smollm" and differs here. The oracle: tokenize digits and the runs between apart.
    pieces = re.findall(r"\d|\D+", text)
    expected = [i for piece in pieces for i in hf_smol.encode(piece, add_special_tokens=False)]
    assert smol.encode(text) == expected


# SmolLM2's vocabulary lacks 21 of the 256 bytes: some control characters, and lead bytes of planes 4-11 and
# of no valid UTF-8 at all. Text with those cannot round-trip (transformers drops them just the same).
SMOL_TEXT = st.text(
    st.characters(
        max_codepoint=0x3FFFF, exclude_categories=["Cs"], exclude_characters="\x04\x06\x13\x14\x16\x1d"
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(SMOL_TEXT)
def test_it_round_trips_any_unicode_with_the_gguf_tokenizer(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text)) == text


def test_it_drops_bytes_missing_from_the_vocabulary_like_transformers(smol: Tokenizer, hf_smol: Any) -> None:
    text = "a\x04b \U00040000 c"
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(smol.encode("a\x04b")) == "ab"


def test_it_reads_special_ids_from_gguf_metadata(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == (2,)
    assert smol.bos_token_id == 1
    assert smol.special_token_ids == frozenset(range(17))
    assert smol.token_bytes(2) == b"<|im_end|>"
    assert smol.token_bytes(smol.encode(" world")[0]) == b" world"


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello! 你好"},
        {"role": "user", "content": "Line one\nline two"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_it_renders_smollm2_chat_template_like_transformers(
    smol: Tokenizer, hf_smol: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smol.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert smol.encode(ours)[0] == 1  # <|im_start|> is matched whole, as a special token


def test_it_caches_the_gguf_tokenizer(smol: Tokenizer) -> None:
    assert load_tokenizer("random", None, "llama") is smol
    assert load_tokenizer("gguf", smollm2_gguf_path(), "llama") is smol


# ---- chat templates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user", "content": ["a", "list"]}],
        [{"role": "user"}],
        ["user: hi"],
    ],
)
def test_it_rejects_bad_messages(gpt2: Tokenizer, smol: Tokenizer, messages: Any) -> None:
    for tokenizer in (gpt2, smol):
        with pytest.raises(InvalidRequestError) as err:
            tokenizer.apply_chat_template(messages)
        assert err.value.param == "messages"


def test_it_renders_the_plain_template_for_gpt2(gpt2: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    assert (
        gpt2.apply_chat_template(messages)
        == "System: You are terse.\nUser: Hi!\nAssistant: Hello.\nUser: Bye.\nAssistant:"
    )
    assert (
        gpt2.apply_chat_template(messages[:2], add_generation_prompt=False)
        == "System: You are terse.\nUser: Hi!\n"
    )
    assert gpt2.chat_stop_strings == ("\nUser:", "\nSystem:")


def test_it_renders_a_developer_message_as_the_system_one(gpt2: Tokenizer, smol: Tokenizer) -> None:
    # OpenAI's developer role replaces system; a template on the Hub knows only system.
    for tokenizer in (gpt2, smol):
        as_system, as_developer = (
            tokenizer.apply_chat_template(
                [{"role": role, "content": "Be terse."}, {"role": "user", "content": "Hi"}]
            )
            for role in ("system", "developer")
        )
        assert as_developer == as_system


def test_it_turns_template_exceptions_into_request_errors() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="user first"):
        template.render([{"role": "assistant", "content": "hi"}])


def test_it_sandboxes_chat_templates() -> None:
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError):
        escape.render([{"role": "user", "content": "hi"}])
    mutate = ChatTemplate(
        "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}"
    )
    with pytest.raises(InvalidRequestError):
        mutate.render([{"role": "user", "content": "hi"}])


def test_it_refuses_a_template_that_does_not_compile() -> None:
    with pytest.raises(ModelLoadError, match="chat template"):
        ChatTemplate("{% for m in messages %}never closed")


# ---- HF directories and small GGUF files ------------------------------------------------------------

TOY_TOKENS = [BYTE_TO_CHAR[b] for b in range(256)] + ["he", "ll", "hell", "Ġw", "or", "<|endoftext|>", "<s>"]
TOY_MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]
HELLO_WORLD = [258, ord("o"), 259, 260, ord("l"), ord("d")]  # hell o Ġw or l d


def test_it_loads_a_gpt2_style_vocab_and_merges_dir(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOY_TOKENS)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TOY_MERGES) + "\n")
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}"
    config = {"eos_token": {"content": "<|endoftext|>"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer("hf_dir", tmp_path, "gpt2")
    assert tok.encode("hello world") == HELLO_WORLD
    assert tok.encode("hello<|endoftext|>") == [258, ord("o"), 261]
    assert tok.decode(HELLO_WORLD) == "hello world"
    assert tok.eos_token_ids == (261,)
    assert tok.special_token_ids == frozenset({261})
    assert tok.token_bytes(259) == b" w"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]<|endoftext|>"


def test_it_loads_an_hf_dir_saved_by_transformers(tmp_path: Path, hf_smol: Any) -> None:
    hf_smol.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in VARIED:
        assert tok.encode(text) == hf_smol.encode(text, add_special_tokens=False)
    assert tok.eos_token_ids == (2, 0)
    assert tok.token_bytes(tok.encode(" world")[0]) == b" world"
    messages = CONVERSATIONS[1]
    assert tok.apply_chat_template(messages) == hf_smol.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_it_picks_a_tokenizer_by_model_source(tmp_path: Path, gpt2: Tokenizer) -> None:
    assert load_tokenizer("random", None, "gpt2") is gpt2
    assert load_tokenizer("hf_dir", tmp_path, "gpt2") is gpt2  # a GPT-2 checkpoint without tokenizer files
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer("hf_dir", tmp_path, "llama")
    with pytest.raises(ModelLoadError):
        load_tokenizer("carrier-pigeon", None, "gpt2")


def _write_toy_gguf(path: Path, model: str = "gpt2", pre: str = "default") -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOY_TOKENS)
    writer.add_token_types([TOKEN_TYPE_CONTROL if t.startswith("<") else 1 for t in TOY_TOKENS])
    writer.add_token_merges(TOY_MERGES)
    writer.add_bos_token_id(262)
    writer.add_eos_token_id(261)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_it_builds_a_tokenizer_from_a_small_gguf(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(_write_toy_gguf(tmp_path / "toy.gguf"))
    assert tok.encode("hello world") == HELLO_WORLD
    assert tok.encode("hello world", add_special_tokens=True) == [262, *HELLO_WORLD]
    assert (tok.bos_token_id, tok.eos_token_ids) == (262, (261,))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"


def test_it_refuses_gguf_files_it_cannot_read(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_gguf(junk)
    with pytest.raises(ModelLoadError, match="'llama' is not supported"):
        Tokenizer.from_gguf(_write_toy_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf(_write_toy_gguf(tmp_path / "pre.gguf", pre="mystery"))


def test_token_texts_hold_whole_characters_only(gpt2: Tokenizer) -> None:
    eos = gpt2.eos_token_ids[0]
    emoji_start = gpt2.encode("😀")[0]  # F0 9F 98: no character on its own
    word = gpt2.encode(" hello")[0]
    shown, skipped = gpt2.token_texts(skip_special_tokens=False), gpt2.token_texts(skip_special_tokens=True)
    assert len(shown) == len(skipped) == gpt2.vocab_size
    assert shown[word] == skipped[word] == " hello"
    assert shown[emoji_start] is None and skipped[emoji_start] is None
    assert shown[eos] == gpt2.decode([eos]) and skipped[eos] == ""
    assert gpt2.token_texts(skip_special_tokens=True) is skipped  # built once
