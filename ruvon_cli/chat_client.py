"""`ruvon chat`: a terminal chat over Ruvon's OpenAI-compatible HTTP API (streamed SSE), with an interactive
REPL that keeps the conversation and a one-shot `-p` mode for scripts. Prints TTFT and tokens/s."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
HISTORY_FILE = Path.home() / ".ruvon_chat_history"
HELP = "commands: /reset (forget the conversation), /exit; Ctrl-C stops a reply, Ctrl-D quits"


class ChatError(Exception):
    """The server refused or broke off a request; the message is the server's own when it sent one."""


@dataclass
class ChatReply:
    text: str
    finish_reason: str | None
    completion_tokens: int
    ttft_s: float | None
    tokens_per_s: float | None

    def stats(self) -> str:
        parts = [f"{self.completion_tokens} tokens"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s * 1000:.0f} ms")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        if self.finish_reason not in (None, "stop"):
            parts.append(f"finish: {self.finish_reason}")
        return "[" + ", ".join(parts) + "]"


class ChatClient:
    """A small HTTP client for /v1/models and streamed /v1/chat/completions."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 600.0) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def models(self) -> list[str]:
        """Return the ids of the served models."""
        response = self.http.get("models")
        _raise_for_error(response)
        return [m["id"] for m in response.json()["data"]]

    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        on_text: Callable[[str], None],
    ) -> ChatReply:
        """Stream one reply, calling on_text with each piece as it arrives; return it with its timings."""
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **params,
        }
        start = time.perf_counter()
        first: float | None = None
        text, finish_reason, chunks, usage_tokens = [], None, 0, None
        with self.http.stream("POST", "chat/completions", json=body) as response:
            _raise_for_error(response)
            for chunk in _sse_chunks(response):
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        first = first or time.perf_counter()
                        chunks += 1
                        text.append(piece)
                        on_text(piece)
                    finish_reason = choice.get("finish_reason") or finish_reason
        end = time.perf_counter()
        tokens = usage_tokens if usage_tokens is not None else chunks
        rate = (tokens - 1) / (end - first) if first is not None and tokens > 1 and end > first else None
        ttft = first - start if first is not None else None
        return ChatReply("".join(text), finish_reason, tokens, ttft, rate)


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500] or response.reason_phrase
    raise ChatError(f"HTTP {response.status_code}: {message}")


def _sse_chunks(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Yield the JSON payloads of a server-sent event stream up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (keep-alives), other fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload:
            raise ChatError(payload["error"].get("message", "the server broke off the stream"))
        yield payload


# -------------------------------------------------------------------------------------- command line


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `chat` on the `ruvon` command line."""
    env = os.environ.get
    parser = subparsers.add_parser("chat", help="chat with a Ruvon server over its OpenAI-compatible API")
    parser.add_argument("-p", "--prompt", help="one-shot: send this prompt, print the reply, exit")
    parser.add_argument("--api-key", default=env("RUVON_API_KEY"), help="default: $RUVON_API_KEY")
    parser.add_argument("--base-url", default=env("RUVON_BASE_URL", DEFAULT_BASE_URL))
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="do not print TTFT and tokens/s")
    parser.set_defaults(func=run_chat)
    return parser


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """Run `ruvon chat`: one-shot with -p, else the REPL; return the exit status."""
    if not args.api_key:
        print("error: pass --api-key or set RUVON_API_KEY", file=sys.stderr)
        return 2
    params = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    if args.seed is not None:
        params["seed"] = args.seed
    try:
        with ChatClient(args.base_url, args.api_key) as client:
            model = args.model or client.models()[0]
            session = ChatSession(client, model, params, args.system, quiet=args.quiet)
            if args.prompt is not None:
                session.ask(args.prompt)
                return 0
            return session.repl(stdin)
    except ChatError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"\nerror: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 1


class ChatSession:
    """A conversation: the history sent with every turn, replies streamed to stdout, stats to stderr."""

    def __init__(
        self, client: ChatClient, model: str, params: dict[str, Any], system: str | None, quiet: bool = False
    ) -> None:
        self.client, self.model, self.params, self.quiet = client, model, params, quiet
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = list(self.system)

    def ask(self, prompt: str) -> ChatReply:
        """Send one user turn, stream the reply, and add both to the history."""
        turn = [*self.messages, {"role": "user", "content": prompt}]
        reply = self.client.chat(self.model, turn, self.params, _write_now)
        print(flush=True)
        if not self.quiet:
            print(reply.stats(), file=sys.stderr, flush=True)
        self.messages = [*turn, {"role": "assistant", "content": reply.text}]
        return reply

    def repl(self, stdin: TextIO | None = None) -> int:
        """Read prompts until /exit or end of input; a failed turn is reported and the chat goes on."""
        read = _line_reader(stdin)
        print(f"chatting with {self.model}; {HELP}", file=sys.stderr)
        while (line := read()) is not None:
            line = line.strip()
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                self.messages = list(self.system)
                print("[conversation cleared]", file=sys.stderr)
            elif line == "/help":
                print(HELP, file=sys.stderr)
            elif line:
                self._turn(line)
        return 0

    def _turn(self, line: str) -> None:
        try:
            self.ask(line)
        except KeyboardInterrupt:  # closing the stream makes the server cancel the request
            print("\n[stopped]", file=sys.stderr)
        except ChatError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _line_reader(stdin: TextIO | None) -> Callable[[], str | None]:
    """Return a prompt reader: input() with readline history on a terminal, plain lines otherwise."""
    if stdin is not None or not sys.stdin.isatty():
        stream = stdin or sys.stdin
        return lambda: stream.readline() or None
    try:
        import readline

        if HISTORY_FILE.exists():
            readline.read_history_file(HISTORY_FILE)
        atexit.register(readline.write_history_file, HISTORY_FILE)
    except (ImportError, OSError):
        pass  # no readline (Windows) or an unreadable history: line editing without history

    def read() -> str | None:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in Python's REPL
            print(file=sys.stderr)
            return ""

    return read
