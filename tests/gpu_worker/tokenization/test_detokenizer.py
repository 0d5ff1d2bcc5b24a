"""Incremental detokeniser (whole UTF-8 characters only) and stop-string matcher (hold-back, truncation)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.errors import InvalidRequestError
from gpu_worker.tokenization.detokenizer import (
    IncrementalDetokenizer,
    StopStringMatcher,
    find_stop,
    partial_stop_length,
)
from gpu_worker.tokenization.tokenizer import Tokenizer


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    """Return the deltas of pushing ids one by one, the flush included as the last delta."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


# ---- incremental detokeniser --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2", "smol"])
@pytest.mark.parametrize("text", ["Party 😀🎉 time", "你好，世界！", "family 👩‍👩‍👧 ok", "∑ x² ≈ π"])
def test_it_streams_multibyte_characters_split_across_tokens(
    which: str, text: str, request: pytest.FixtureRequest
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    # Some token ended mid-character and had to wait for the next one.
    partial = [i for i in ids if not _is_utf8(tokenizer.token_bytes(i))]
    assert partial and "" in deltas[:-1]


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_it_holds_an_emoji_until_its_last_byte(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("😀")
    assert len(ids) == 2  # F0 9F 98 | 80
    detok = IncrementalDetokenizer(gpt2)
    assert detok.push(ids[0]) == ""
    assert detok.push(ids[1]) == "😀"
    assert detok.flush() == ""


def test_it_drops_an_unfinished_character_at_the_end(gpt2: Tokenizer) -> None:
    first = gpt2.encode("😀")[0]
    detok = IncrementalDetokenizer(gpt2)
    assert detok.push(gpt2.encode("ok")[0]) == "ok"
    assert detok.push(first) == ""
    assert detok.flush() == ""  # not U+FFFD: max_tokens cut the character, as vLLM drops it


def test_it_replaces_invalid_bytes_as_soon_as_they_are_certain(gpt2: Tokenizer) -> None:
    first = gpt2.encode("😀")[0]  # an unfinished 4-byte character ...
    detok = IncrementalDetokenizer(gpt2)
    assert detok.push(first) == ""
    assert detok.push(gpt2.encode("A")[0]) == "\ufffdA"  # ... that an ASCII letter can never finish


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_it_streams_any_unicode_back_exactly_with_gpt2(gpt2: Tokenizer, text: str) -> None:
    assert "".join(stream(gpt2, gpt2.encode(text))) == text


@settings(max_examples=100, deadline=None)
@given(
    st.text(
        st.characters(
            max_codepoint=0x3FFFF, exclude_categories=["Cs"], exclude_characters="\x04\x06\x13\x14\x16\x1d"
        ),
        max_size=60,
    )
)
def test_it_streams_any_unicode_back_exactly_with_the_gguf_tokenizer(smol: Tokenizer, text: str) -> None:
    # The excluded characters need bytes SmolLM2's vocabulary lacks (see test_tokenizer.py).
    assert "".join(stream(smol, smol.encode(text), skip_special_tokens=False)) == text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=12))
def test_it_agrees_with_a_full_decode_even_on_invalid_utf8(gpt2: Tokenizer, ids: list[int]) -> None:
    # Random ids are mostly ragged byte sequences: replacements must land exactly where a one-shot decode puts them.
    assert_agrees(stream(gpt2, ids), gpt2.decode(ids, skip_special_tokens=True))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=12))
def test_it_agrees_with_the_gguf_tokenizers_decode(smol: Tokenizer, ids: list[int]) -> None:
    assert_agrees(stream(smol, ids), smol.decode(ids, skip_special_tokens=True))


def assert_agrees(deltas: list[str], full: str) -> None:
    """The stream equals a one-shot decode, except that an unfinished last character (U+FFFD there) is dropped."""
    text = "".join(deltas)
    assert full in (text, text + "\ufffd"), (text, full)


def test_it_skips_special_tokens_unless_asked(smol: Tokenizer) -> None:
    ids = smol.encode("Sure.<|im_end|>")
    assert ids[-1] == 2
    assert "".join(stream(smol, ids)) == "Sure."
    assert "".join(stream(smol, ids, skip_special_tokens=False)) == "Sure.<|im_end|>"


def test_it_gives_no_text_for_ids_past_the_vocabulary(gpt2: Tokenizer) -> None:
    # A model's embedding may be padded past the tokenizer (50257 -> 50304): such rows have no text.
    assert stream(gpt2, [15496, 50300]) == ["Hello", "", ""]


# ---- stop strings ---------------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    """Return what each feed released (then the flush), and whether a stop string ended the output."""
    out, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
    out.append(matcher.flush())
    return out, stopped


def test_it_finds_a_stop_string_split_across_deltas() -> None:
    matcher = StopStringMatcher(["\nUser:"])
    out, stopped = feed_all(matcher, ["Sure!", "\nUs", "er", ": next question"])
    assert out == ["Sure!", "", "", "", ""]
    assert stopped and matcher.matched == "\nUser:"


def test_it_releases_held_back_text_when_the_prefix_goes_nowhere() -> None:
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.feed("Hi\nUs") == ("Hi", False)
    assert matcher.held == "\nUs"
    assert matcher.feed("e it") == ("\nUse it", False)


def test_it_releases_held_back_text_at_the_end() -> None:
    out, stopped = feed_all(StopStringMatcher(["###"]), ["one #", "#"])
    assert out == ["one ", "", "##"]
    assert not stopped


def test_it_stops_at_the_earliest_of_several_stops() -> None:
    matcher = StopStringMatcher(["END", "."])
    out, stopped = feed_all(matcher, ["Hello world. The END"])
    assert out == ["Hello world", ""]
    assert stopped and matcher.matched == "."


def test_it_stops_at_the_very_start() -> None:
    matcher = StopStringMatcher(["Q:"])
    assert matcher.feed("Q: why?") == ("", True)
    assert matcher.feed("more") == ("", True)  # nothing after a stop
    assert matcher.flush() == ""


def test_it_passes_text_through_without_stops() -> None:
    assert feed_all(StopStringMatcher([]), ["a", "b"]) == (["a", "b", ""], False)


def test_it_rejects_empty_stop_strings() -> None:
    with pytest.raises(InvalidRequestError) as err:
        StopStringMatcher(["ok", ""])
    assert err.value.param == "stop"


def test_it_measures_partial_stops() -> None:
    assert partial_stop_length("Hello, Wor", ["World"]) == 3
    assert partial_stop_length("abab", ["abc", "bab!"]) == 3
    assert partial_stop_length("World", ["World"]) == 0  # complete stops are find_stop's business
    assert find_stop("a.b!c", ["!", "."]) == (1, ".")
    assert find_stop("abc", ["x"]) is None


@settings(max_examples=500, deadline=None)
@given(
    text=st.text("ab\n:", max_size=30), stops=st.lists(st.text("ab\n:", min_size=1, max_size=8), max_size=3)
)
def test_it_measures_partial_stops_as_the_definition_says(text: str, stops: list[str]) -> None:
    # The longest suffix of text that is a proper prefix of a stop string, by brute force.
    expected = max(
        (n for stop in stops for n in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:n])),
        default=0,
    )
    assert partial_stop_length(text, stops) == expected


@settings(max_examples=300, deadline=None)
@given(
    text=st.text("ab\n:", max_size=30),
    stops=st.lists(st.text("ab\n:", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_it_emits_exactly_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = [0, *sorted(set(cuts)), len(text)]
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, stopped = feed_all(StopStringMatcher(stops), deltas)
    # Stops are checked as text arrives: the output ends before the earliest stop string in the text
    # received when the first one completes (a longer stop that starts earlier but is not complete yet
    # does not count: see the test below).
    hit = next((h for b in bounds[1:] if (h := find_stop(text[:b], stops))), None)
    assert "".join(out) == (text[: hit[0]] if hit else text)
    assert stopped == (hit is not None)


def test_a_stop_that_completes_first_ends_the_output() -> None:
    # ":" completes with the first delta; "a::", which starts earlier, would only complete with the second.
    out, stopped = feed_all(StopStringMatcher([":", "a::"]), ["a:", ":"])
    assert ("".join(out), stopped) == ("a", True)
