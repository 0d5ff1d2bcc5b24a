"""A real redis-server restarted (SIGKILL, then started again with its append-only file) under load against the
production shape (bench/stack.py): every SSE stream and chat websocket ends, and every request's usage record
agrees with what its client was told (a told error is never billed, a served request is billed its tokens)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bench.stack import ROOT, Stack, StackConfig, postgres_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL at 127.0.0.1:5432"),
]

END_BOUND_S = 60  # every client must have its ending this long after Redis is back (it hung forever before)
CHAT_USER = """
import django; django.setup()
from django.contrib.auth import get_user_model
from accounts.models import Tenant
user = get_user_model().objects.create_user("chatter", password="chat-pw-123")
Tenant.objects.get(slug="stress").add_member(user, "member")
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Few jobs per worker, so at the restart some jobs wait in the stream while others stream tokens.
    config = StackConfig(
        num_blocks=128, redis_aof=True, worker_args=["--heartbeat-s", "1", "--max-inflight", "4"]
    )
    with Stack(config) as running:
        subprocess.run([sys.executable, "-c", CHAT_USER], cwd=ROOT, env=running.env, check=True)
        yield running


@dataclass
class Told:
    """What one client was told: served (with its completion tokens) or an error code; and whether it ended."""

    request_id: str | None = None
    tokens: int | None = None
    error: str | None = None
    done_line: bool = False  # streams: `data: [DONE]` came
    chunks: int = 0


def _body(stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "one two three", "max_tokens": 100, "ignore_eos": True,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}  # fmt: skip


async def _request(client: httpx.AsyncClient, url: str, key: str, stream: bool, told: Told) -> Told:
    headers = {"Authorization": f"Bearer {key}"}
    body = {k: v for k, v in _body(stream).items() if v is not None}
    async with client.stream("POST", url + "/completions", json=body, headers=headers) as response:
        told.request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            told.error = json.loads(await response.aread())["error"]["code"]
            return told
        if not stream:
            told.tokens = json.loads(await response.aread())["usage"]["completion_tokens"]
            return told
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                told.done_line = True
            elif line.startswith("data: "):
                told.chunks += 1
                payload = json.loads(line[6:])
                if "error" in payload:
                    told.error = payload["error"]["code"]
                elif payload.get("usage"):
                    told.tokens = payload["usage"]["completion_tokens"]
    return told


def _login(url: str) -> str:
    with httpx.Client(base_url=url) as client:
        page = client.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text[:300]
        form = {"username": "chatter", "password": "chat-pw-123", "csrfmiddlewaretoken": token.group(1)}
        client.post("/accounts/login/", data=form)
        return f"sessionid={client.cookies['sessionid']}"


def _chat(ws: Any, max_tokens: int) -> list[dict[str, Any]]:
    """Send one chat message; return the messages up to its ending (done or error)."""
    ws.send(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "params": {"max_tokens": max_tokens}})
    )
    messages: list[dict[str, Any]] = []
    while not messages or messages[-1]["type"] not in ("done", "error"):
        messages.append(json.loads(ws.recv(timeout=END_BOUND_S)))
    return messages


def _settled(stack: Stack, ids: set[str]) -> dict[str, tuple[str, int, float, float]] | None:
    r = stack.redis()
    beats = [hb for hb in stack.heartbeats().values() if time.time() - hb["time"] < 5]
    idle = bool(beats) and all(hb["active"] == 0 for hb in beats)
    billed = stack.billed()
    return billed if idle and r.xlen("ruvon:usage") == 0 and ids <= set(billed) else None


def test_it_ends_every_stream_and_bills_only_what_it_served_across_a_redis_restart(stack: Stack) -> None:
    from websockets.sync.client import connect

    site = stack.urls[0].removesuffix("/v1")
    headers = {"Origin": site, "Cookie": _login(site)}
    with connect(site.replace("http", "ws") + "/ws/chat/", additional_headers=headers, open_timeout=30) as ws:
        json.loads(ws.recv(timeout=30))  # ready
        told, chat, after = _restart_under_load(stack, ws)
    _check_told_equals_billed(stack, told, chat, after)


def _restart_under_load(stack: Stack, ws: Any) -> tuple[list[Told], list[list[dict[str, Any]]], list[Any]]:
    """Restart Redis while 36 completions (two in three streamed) and one chat reply run; return what each
    client was told, then one chat reply after the restart."""
    url, key = stack.urls[0], stack.keys["stress"]
    chat: list[list[dict[str, Any]]] = []
    chat_thread = threading.Thread(target=lambda: chat.append(_chat(ws, 110)), daemon=True)

    async def load() -> list[Told]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
            told = [Told() for _ in range(36)]
            tasks = [
                asyncio.create_task(_request(client, url, key, i % 3 != 0, t)) for i, t in enumerate(told)
            ]
            chat_thread.start()
            while not any(t.chunks >= 2 for t in told):  # restart once tokens are streaming
                await asyncio.sleep(0.01)
            await asyncio.to_thread(stack.restart_redis, 2.0)
            done, pending = await asyncio.wait(tasks, timeout=END_BOUND_S)
            assert not pending, f"{len(pending)} of {len(tasks)} requests never ended after the restart"
            return told

    told = asyncio.run(load())
    chat_thread.join(timeout=END_BOUND_S)
    assert chat, "the chat reply never ended after the restart"
    after = _chat(ws, 3)  # the socket survived and serves again
    assert after[-1]["type"] == "done", after
    return told, chat, after


def _check_told_equals_billed(
    stack: Stack, told: list[Told], chat: list[list[dict[str, Any]]], after: list[Any]
) -> None:
    url, key = stack.urls[0], stack.keys["stress"]
    for t in told:  # one ending each: served, or an error; a stream always ends with [DONE]
        assert (t.tokens is None) != (t.error is None), t
        assert t.done_line or t.chunks == 0, t
    assert any(t.error for t in told), told
    served_after = asyncio.run(_one_after(url, key))
    assert served_after.tokens == 100, served_after
    told.append(served_after)
    ids = {t.request_id for t in told if t.tokens is not None} | {after[0]["request_id"]}
    billed = _wait(lambda: _settled(stack, {i for i in ids if i}), 90, "usage not settled")
    time.sleep(2)  # told-error records are written by the web tier right away; let stragglers land
    billed = stack.billed()
    for t in told:
        assert t.request_id is not None
        record = billed.get(t.request_id)
        if t.tokens is not None:
            assert record is not None and record[:2] == ("completed", t.tokens) and record[2] > 0, (t, record)
        elif record is not None:  # a 503 before submission has no record; any other error is unbilled
            assert record[0] in ("failed", "rejected") and record[2] == 0, (t, record)
    errors_recorded = [t for t in told if t.error and t.request_id in billed]
    assert errors_recorded, "no told error was recorded"

    [reply] = chat
    if reply[-1]["type"] == "error" and reply[0]["type"] == "started":
        record = billed.get(reply[0]["request_id"])
        assert record is None or record[2] == 0, record


async def _one_after(url: str, key: str) -> Told:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        return await _request(client, url, key, True, Told())


def _wait(condition: Any, timeout_s: float, message: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except Exception:  # Redis may still be coming up
            pass
        time.sleep(0.3)
    raise AssertionError(message)
