"""The web chat page in a real headless Chromium against a live server: sign in, type, watch the reply stream
in with its TTFT and tokens/s; pick a tenant's LoRA adapter in the model picker and get its answer. Driven over the DevTools protocol with the `websockets` client; skipped when
no Chromium is installed (.ci/run installs it)."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.live_server import LiveServer, shared_live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed"),
]


class Page:
    """One browser tab, spoken to over the Chrome DevTools protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value


@contextmanager
def open_page(chromium: str) -> Iterator[Page]:
    """Yield the one tab of a fresh headless Chromium (its own profile, a free DevTools port); stop it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tempfile.mkdtemp(prefix="ruvon-chromium-")
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
    browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws_url = _page_websocket(port)
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            yield Page(ws)
    finally:
        browser.terminate()
        browser.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    assert CHROMIUM is not None  # the module is skipped without one
    with open_page(CHROMIUM) as tab:
        yield tab


def _page_websocket(port: int, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        except (httpx.HTTPError, StopIteration):
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.2)


def test_it_streams_a_reply_into_the_chat_page(page: Page) -> None:
    server: LiveServer = shared_live_server()
    name, value = server.login_cookie().split("=", 1)
    page.call("Network.enable")
    page.call("Network.setCookie", name=name, value=value, url=server.url)
    page.call("Page.navigate", url=f"{server.url}/chat/")
    status = page.wait_for("document.getElementById('status')?.textContent.startsWith('connected') && "
                           "document.getElementById('status').textContent")  # fmt: skip
    assert "tiny" in status and "RANDOM" in status
    page.js("document.getElementById('max_tokens').value = '6';"
            "document.getElementById('prompt').value = 'Hello';"
            "document.getElementById('compose').requestSubmit();")  # fmt: skip
    meta = page.wait_for("document.querySelector('.meta')?.textContent")
    assert "TTFT" in meta and "tokens/s" in meta
    assert page.js("document.querySelector('.msg.user').textContent") == "Hello"
    assert page.js("document.querySelector('.msg.assistant').textContent.length") > 0
    assert page.js("document.getElementById('send').disabled") is False


def _reply(page: Page, model: str, prompt: str) -> str:
    """Start a new chat on `model`, send `prompt` greedily, and return the reply once it is done."""
    fields = {"model": model, "temperature": "0", "max_tokens": "8", "prompt": prompt}
    page.js("document.getElementById('reset').click();" + "".join(
        f"document.getElementById({field!r}).value = {value!r};" for field, value in fields.items()
    ) + "document.getElementById('compose').requestSubmit();")  # fmt: skip
    page.wait_for("document.querySelector('.meta')?.textContent")
    return str(page.js("document.querySelector('.msg.assistant').textContent"))


def test_it_chats_on_a_tenant_adapter_picked_in_the_page(page: Page) -> None:
    from tests.inference.lora_files import adapter_zip, peft_tensors

    server: LiveServer = shared_live_server()
    key = {"Authorization": f"Bearer {server.api_key}"}
    upload = httpx.post(
        f"{server.url}/v1/adapters",
        data={"name": "browser-pirate", "base_model": "tiny"},
        files={"file": ("adapter.zip", adapter_zip(tensors=peft_tensors(std=1.0)))},
        headers=key,
        timeout=60,
    )
    assert upload.status_code == 201 and upload.json()["status"] == "ready", upload.text
    try:
        _chat_on_the_adapter(page, server)
    finally:  # the server is shared: other tests list its models
        httpx.delete(f"{server.url}/v1/adapters/browser-pirate", headers=key, timeout=60)


def _chat_on_the_adapter(page: Page, server: LiveServer) -> None:
    before = len(_chat_adapters(server))
    name, value = server.login_cookie().split("=", 1)
    page.call("Network.setCookie", name=name, value=value, url=server.url)
    page.call("Page.navigate", url=f"{server.url}/chat/")
    page.wait_for("document.getElementById('status')?.textContent.startsWith('connected')")
    options = page.js("[...document.querySelectorAll('#model option')].map(o => o.value)")
    assert options == ["tiny", "tiny:browser-pirate"]
    base = _reply(page, "tiny", "Hello there")
    adapted = _reply(page, "tiny:browser-pirate", "Hello there")
    assert base and adapted and base != adapted  # greedy, the same prompt: only the adapter differs
    deadline = time.monotonic() + 10  # the server writes usage on a thread of its own
    while len(_chat_adapters(server)) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _chat_adapters(server)[before:] == ["", "browser-pirate"]  # billed under the tenant's name for it


def _chat_adapters(server: LiveServer) -> list[str]:
    """Return the adapter of every chat usage record written so far, oldest first."""
    with sqlite3.connect(server.db_path) as db:
        rows = db.execute(
            "select adapter from inference_usagerecord where request_id like 'chat-%' order by id"
        )
        return [row[0] for row in rows.fetchall()]
