"""The web front in a real headless Chromium against the live server: the landing page and its sign-in and
sign-out, the chat page (model label, conversation kept across a reload, no empty bubble after an error,
model text rendered as Markdown and never as HTML), the keys page (a key shown once, working, revoked) and
the tenant and cost pages."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.test_chat_page import CHROMIUM, Page, page  # noqa: F401 (the fixture)
from tests.live_server import DEMO_PASSWORD, DEMO_USER, LiveServer, shared_live_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")]


def open_page(tab: Page, server: LiveServer, path: str, ready: str, signed_in: bool = True) -> None:
    """Navigate to `path` (with the demo user's session cookie unless signed_in is False) and wait for `ready`."""
    tab.call("Network.enable")
    tab.call("Network.clearBrowserCookies")
    if signed_in:
        name, value = server.login_cookie().split("=", 1)
        tab.call("Network.setCookie", name=name, value=value, url=server.url)
    tab.call("Page.navigate", url=server.url + path)
    tab.wait_for(
        f"document.readyState === 'complete' && location.pathname === {path.split('?')[0]!r} && !!({ready})"
    )


def test_it_lands_signs_in_and_signs_out(page: Page) -> None:  # noqa: F811
    server = shared_live_server()
    open_page(page, server, "/", "document.getElementById('sign-in')", signed_in=False)
    assert "ruvon-demo" in page.js("document.getElementById('demo-hint').innerText")
    links = page.js("[...document.querySelectorAll('nav[aria-label=main] a')].map(a => a.textContent)")
    assert links[:5] == ["Chat", "API keys", "Tenant", "Costs", "API docs"]
    page.js("document.getElementById('sign-in').click()")
    page.wait_for("location.pathname === '/accounts/login/' && document.readyState === 'complete'")
    page.js(f"document.getElementById('id_username').value = {DEMO_USER!r};"
            f"document.getElementById('id_password').value = {DEMO_PASSWORD!r};"
            "document.querySelector('form[aria-label=\"sign in\"]').requestSubmit();")  # fmt: skip
    page.wait_for("location.pathname === '/chat/' && !!document.getElementById('sign-out')")
    page.js("document.getElementById('sign-out').click()")
    page.wait_for(
        "location.pathname === '/' && document.readyState === 'complete' && !!document.getElementById('sign-in')"
    )


def test_it_keeps_the_chat_safe_and_across_reloads(page: Page) -> None:  # noqa: F811
    server = shared_live_server()
    open_page(page, server, "/chat/", "document.getElementById('status').textContent.startsWith('connected')")
    assert page.js("document.getElementById('model-label').textContent").startswith("tiny · tiny (RANDOM")
    page.js("document.getElementById('reset').click();"
            "document.getElementById('max_tokens').value = '5';"
            "document.getElementById('prompt').value = 'Hello';"
            "document.getElementById('compose').requestSubmit();")  # fmt: skip
    page.wait_for("!!document.querySelector('.meta')")
    # A reply written by the model is text, whatever it holds: plant one as if streamed, then reload.
    store = page.js("document.getElementById('log').dataset.store")
    hostile = "<img src=x onerror=\"window.pwned=1\">\n```py\nx = '<b>'\n```\nsee **this** and `a<b`"
    page.js(f"const h = JSON.parse(localStorage.getItem({store!r}));"
            f"h.push({{role: 'user', content: 'go'}}, {{role: 'assistant', content: {json.dumps(hostile)}}});"
            f"localStorage.setItem({store!r}, JSON.stringify(h)); location.reload();")  # fmt: skip
    page.wait_for("document.getElementById('status').textContent.startsWith('connected') && "
                  "document.querySelectorAll('#log .msg').length === 4")  # fmt: skip
    assert page.js("document.querySelector('#log .msg.user').textContent") == "Hello"
    last = "document.querySelectorAll('#log .msg.assistant')[1]"
    assert page.js(f"{last}.querySelector('img, b')") is None and page.js("window.pwned") is None
    assert page.js(f"{last}.querySelector('pre code').textContent") == "x = '<b>'"
    assert page.js(f"{last}.querySelector('strong').textContent") == "this"
    assert page.js(f"{last}.querySelector('p code').textContent") == "a<b"
    assert '<img src=x onerror="window.pwned=1">' in page.js(f"{last}.textContent")
    # A refused request: an error line, and no empty reply bubble left behind.
    page.js("document.getElementById('temperature').value = '-1';"
            "document.getElementById('prompt').value = 'Hi';"
            "document.getElementById('compose').requestSubmit();")  # fmt: skip
    page.wait_for("!!document.querySelector('#log .msg.error')")
    assert (
        page.js("[...document.querySelectorAll('#log .msg.assistant')].filter(n => !n.textContent).length")
        == 0
    )
    assert page.js("document.getElementById('send').disabled") is False


def test_it_creates_shows_once_and_revokes_a_key_in_the_keys_page(page: Page) -> None:  # noqa: F811
    server = shared_live_server()
    open_page(page, server, "/keys/", "document.getElementById('create-key')")
    page.js("document.getElementById('id_name').value = 'browser';"
            "document.getElementById('id_max_requests_per_minute').value = '30';"
            "document.getElementById('create-key').requestSubmit();")  # fmt: skip
    plaintext = page.wait_for("document.getElementById('new-key-value')?.textContent")
    assert (
        httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {plaintext}"}).status_code
        == 200
    )
    prefix = plaintext.split("_")[1]
    page.call("Page.navigate", url=f"{server.url}/keys/")
    row = f"document.querySelector('tr[data-key=\"{prefix}\"]')"
    page.wait_for(f"document.readyState === 'complete' && !document.getElementById('new-key') && !!{row}")
    assert plaintext not in page.js("document.body.innerHTML")
    assert page.js(f"{row}.querySelector('.last-used').textContent") != "never"
    page.js(f"{row}.querySelector('button.danger').click()")
    page.wait_for(f"document.readyState === 'complete' && {row}?.classList.contains('revoked')")
    assert (
        httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {plaintext}"}).status_code
        == 401
    )


def test_it_shows_the_tenant_and_its_costs_on_a_cpu(page: Page) -> None:  # noqa: F811
    server = shared_live_server()
    open_page(page, server, "/tenant/", "document.getElementById('members')")
    assert page.js("document.getElementById('role').textContent") == "owner"
    assert "demo" in page.js("document.getElementById('members').innerText")
    assert page.js("document.getElementById('spend').textContent").startswith("$")
    httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4},
               headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)  # fmt: skip
    open_page(page, server, "/costs/?period=1h", "document.querySelectorAll('svg.chart').length === 5")
    tile = page.js("document.querySelector('.summary .utilisation').innerText")
    assert tile.upper().startswith("CPU UTILISATION") and "busiest minute" in tile
    assert "Device-seconds" in page.js("document.querySelector('table.costs thead').innerText")
