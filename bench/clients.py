"""Time to first token as each streaming client sees it, one request at a time on an idle embedded platform:
the openai SDK (streamed chat, first content chunk), `ruvon chat`'s client (ruvon_cli/chat_client.py, its
own TTFT), and the web chat's websocket (/ws/chat/, send to the first delta with text). Beside it, an inner TTFT
where the client is told one: the worker's (the SDK's usage chunk, `ruvon.timings.ttft_s`) or the web tier's
(the websocket's "done" event, from the consumer's submit to its first token), so the difference is what
the layers outside it add. Each client holds one connection for all its requests.

    python -m bench.clients --model random:tiny --requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, source_commit, write_json  # noqa: E402
from bench.serving import SAME_ENGINE, ms, percentile  # noqa: E402
from ruvon_cli.chat_client import ChatClient  # noqa: E402
from tests.live_server import LiveServer, start_live_server  # noqa: E402

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about the river and the stone."}]


async def sdk_ttfts(
    server: LiveServer, model: str, max_tokens: int, n: int
) -> list[tuple[float, float | None]]:
    """Return (the SDK's TTFT, the worker's TTFT from the usage chunk's `ruvon` field) of n chat streams, one
    after another on one client (its connection kept alive, as an application holds it)."""
    samples = []
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0) as sdk:
        for _ in range(n):
            sent = time.perf_counter()
            first, worker = None, None
            stream = await sdk.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, temperature=0.0,
            )  # fmt: skip
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - sent
                extension = (chunk.model_extra or {}).get("ruvon")
                if extension:
                    worker = extension["timings"]["ttft_s"]
            assert first is not None, "the stream had no content"
            samples.append((first, worker))
    return samples


def cli_ttfts(server: LiveServer, model: str, max_tokens: int, n: int) -> list[tuple[float, None]]:
    """Return `ruvon chat`'s own TTFT of n replies on one ChatClient (as its REPL holds one)."""
    samples: list[tuple[float, None]] = []
    with ChatClient(server.url + "/v1", server.api_key) as client:
        for _ in range(n):
            params = {"max_tokens": max_tokens, "temperature": 0.0}
            reply = client.chat(model, MESSAGES, params, lambda _: None)
            assert reply.ttft_s is not None, "the reply had no content"
            samples.append((reply.ttft_s, None))
    return samples


def websocket_ttft(ws: Any, max_tokens: int) -> tuple[float, float | None]:
    """Send one message on an open chat socket; return (send to first text delta, the web tier's TTFT)."""
    sent = time.perf_counter()
    ws.send(json.dumps({"messages": MESSAGES, "params": {"max_tokens": max_tokens, "temperature": 0.0}}))
    first = None
    while True:
        event = json.loads(ws.recv(timeout=60))
        if event["type"] == "delta" and event["text"] and first is None:
            first = time.perf_counter() - sent
        elif event["type"] == "done":
            assert first is not None, "the reply had no text"
            return first, event["client"]["ttft_s"]
        elif event["type"] == "error":
            raise RuntimeError(event)


def row(client: str, samples: Sequence[tuple[float, float | None]]) -> dict[str, Any]:
    seen = [s for s, _ in samples]
    inner = [w for _, w in samples if w is not None]
    return {
        "client": client,
        "requests": len(samples),
        "ttft_p50_ms": ms(percentile(seen, 50)),
        "ttft_p99_ms": ms(percentile(seen, 99)),
        "inner_ttft_p50_ms": ms(percentile(inner, 50)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--served-name", default="tiny")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--name", default="clients", help="results file stem under bench/results/")
    args = parser.parse_args(argv)
    server = start_live_server(
        {"RUVON_MODEL": args.model, "RUVON_MODEL_NAME": args.served_name, **SAME_ENGINE}
    )
    try:
        n, model, tokens = args.requests, args.served_name, args.max_tokens
        cli_ttfts(server, model, 4, 2)  # warm-up
        rows = [
            row("openai SDK (SSE)", asyncio.run(sdk_ttfts(server, model, tokens, n))),
            row("ruvon chat (SSE, httpx)", cli_ttfts(server, model, tokens, n)),
        ]
        headers = {"Origin": server.url, "Cookie": server.login_cookie()}
        with connect(server.url.replace("http", "ws") + "/ws/chat/", additional_headers=headers) as ws:
            json.loads(ws.recv(timeout=30))  # ready
            rows.append(row("web chat (websocket)", [websocket_ttft(ws, tokens) for _ in range(n)]))
    finally:
        server.stop()
    print(f"{n} sequential chat requests each, {tokens} new tokens, {args.model}, commit {source_commit()}")
    print_table(rows)
    print("wrote", write_json(args.name, {"args": vars(args), "commit": source_commit(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
