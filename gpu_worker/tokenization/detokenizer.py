"""Streaming text out of generated tokens: an incremental detokeniser that never splits a UTF-8 character,
and a stop-string matcher that holds back text which might still turn into a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from gpu_worker.errors import InvalidRequestError
from gpu_worker.tokenization.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas, in O(1) per token.

    A byte-level token is a run of bytes, not of characters: "😀" is the four bytes F0 9F 98 80, which GPT-2
    spells as two tokens ("\\xf0\\x9f\\x98" and "\\x80"). Decoding each token on its own would print two
    U+FFFD. So we feed each token's bytes to an incremental UTF-8 decoder, which returns only the characters
    that are complete and keeps the bytes of an unfinished one until its last byte arrives. Bytes that can
    never become a character (0xFF, a stray continuation byte) turn into U+FFFD as soon as that is certain,
    exactly where a one-shot decode of the whole output would put them. An unfinished character at the end
    is dropped.

    Most tokens are whole characters on their own and most of the time the decoder holds nothing: such a
    token's text is looked up in the tokenizer's table (Tokenizer.token_texts), with no decoder call.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._texts = tokenizer.token_texts(skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._clean = True  # the decoder holds no bytes of an unfinished character

    def push(self, token_id: int) -> str:
        """Return the text that token_id completes ("" while a character is still unfinished)."""
        if not 0 <= token_id < len(self._texts):
            return ""  # ids past the tokenizer (padding rows of an embedding) have no text
        text = self._texts[token_id]
        if text is not None and self._clean:
            return text
        if token_id in self.skip_ids:  # skipped special tokens have no text
            return ""
        text = self._utf8.decode(self.tokenizer.token_bytes(token_id))
        self._clean = not self._utf8.getstate()[0]
        return text

    def flush(self) -> str:
        """Return what is left at the end: nothing. An unfinished character (max_tokens cut it) is dropped, as
        vLLM does, rather than shown as U+FFFD; the decoder only ever holds a valid prefix of a character."""
        self._utf8.reset()
        self._clean = True
        return ""


# ---- stop strings -----------------------------------------------------------------------------------


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Return (index, stop) for the stop string that occurs earliest in text, or None if none occurs."""
    hits = [(index, stop) for stop in stops if (index := text.find(stop)) != -1]
    return min(hits, default=None, key=lambda hit: hit[0])


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Return the length of the longest suffix of text that is a proper prefix of some stop string.

    partial_stop_length("Hello, Wor", ["World"]) == 3: the next delta may complete "World".
    """
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopStringMatcher:
    """Decides, delta by delta, which generated text is safe to show, for OpenAI-style `stop` strings.

    The output must end right before the first stop string and must not contain it, yet text is streamed
    before we know what comes next. So each feed() returns the text that can no longer be part of a stop
    string, and holds back the tail that still could (a suffix that is a prefix of a stop string):

        m = StopStringMatcher(["\\nUser:"])
        m.feed("Sure!\\nUs")   -> ("Sure!", False)   "\\nUs" is held: it may become "\\nUser:"
        m.feed("er: hi")      -> ("", True)          the stop string is complete; output ends at "Sure!"

    Had the second delta been "e it", feed() would have released "\\nUse it". When generation ends for
    another reason (EOS, max_tokens), flush() releases whatever is still held back. With include_stop (vLLM's
    include_stop_str_in_output) the output ends right after the stop string instead, which it then contains.

    Why searching only held + new text is enough: whatever was released was, when released, no prefix of any
    stop string reaching the end of the text, so no stop string can start inside released text. The text held
    back is shorter than the longest stop string, so a feed() costs time in proportion to its new text and
    the stop strings, never to the length of the output so far.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.matched: str | None = None  # the stop string that ended the output, once one has
        self.held = ""  # text received but not yet released

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, new_text: str, match: bool = True) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string has ended the output). match=False releases
        the text unsearched (the tokens before min_tokens cannot stop the output)."""
        if not self.stops:  # nothing to watch for: every token of every request without `stop` comes here
            return new_text, False
        if self.stopped:
            return "", True
        text = self.held + new_text
        if not match:
            self.held = ""
            return text, False
        hit = find_stop(text, self.stops)
        if hit is not None:
            index, self.matched = hit
            self.held = ""
            return text[: index + len(self.matched) if self.include_stop else index], True
        cut = len(text) - partial_stop_length(text, self.stops)
        self.held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """Return the held-back text when the output ends without a stop string ("" after a stop)."""
        held, self.held = self.held, ""
        return "" if self.stopped else held
