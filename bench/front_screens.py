"""Screenshots of the web front for the README: the landing, chat, keys, tenant and cost pages, taken in
headless Chromium against a live server running the real SmolLM2-135M-Instruct on the CPU.

    python bench/front_screens.py --images docs/images
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.test_chat_page import Page, open_page  # noqa: E402
from tests.live_server import LiveServer, start_live_server  # noqa: E402

SMOLLM2 = {"RUVON_MODEL": "smollm2", "RUVON_MODEL_NAME": "smollm2-135m-instruct", "RUVON_NUM_BLOCKS": "256"}
QUESTIONS = [
    "What is the capital of France?",
    "Name three planets.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
]
CHAT_PROMPT = "Write a Python function that adds two numbers, in a code block."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.images.mkdir(parents=True, exist_ok=True)
    server = start_live_server(SMOLLM2, ready_timeout_s=600)  # SmolLM2 loads slowly on a busy CPU
    try:
        for question in QUESTIONS:  # some usage for the cost page
            body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
                    "max_tokens": 16, "temperature": 0}  # fmt: skip
            headers = {"Authorization": f"Bearer {server.api_key}"}
            httpx.post(
                f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=300
            ).raise_for_status()
        with browser() as page:
            take(page, server, args.images)
    finally:
        server.stop()


def take(page: Page, server: LiveServer, folder: Path) -> None:
    """Visit each page as the demo user (the landing page signed out) and save it as a PNG."""
    page.call("Network.enable")
    page.call("Emulation.setDeviceMetricsOverride", width=1280, height=820, deviceScaleFactor=1, mobile=False)
    visit(page, server.url + "/", "!!document.getElementById('demo-hint')")
    save(page, folder / "front-landing.png")
    name, value = server.login_cookie().split("=", 1)
    page.call("Network.setCookie", name=name, value=value, url=server.url)
    visit(
        page, server.url + "/chat/", "document.getElementById('status').textContent.startsWith('connected')"
    )
    page.js("document.getElementById('reset').click(); document.getElementById('temperature').value = '0';"
            "document.getElementById('max_tokens').value = '80';"
            f"document.getElementById('prompt').value = {CHAT_PROMPT!r};"
            "document.getElementById('compose').requestSubmit();")  # fmt: skip
    page.wait_for("!!document.querySelector('.meta')", timeout_s=900)
    save(page, folder / "front-chat.png")
    visit(page, server.url + "/keys/", "!!document.getElementById('create-key')")
    page.js("document.getElementById('id_name').value = 'notebook';"
            "document.getElementById('id_max_requests_per_minute').value = '60';"
            "document.getElementById('create-key').requestSubmit();")  # fmt: skip
    page.wait_for("!!document.getElementById('new-key-value')")
    save(page, folder / "front-keys.png")
    visit(page, server.url + "/tenant/", "!!document.getElementById('members')")
    save(page, folder / "front-tenant.png")
    page.call(
        "Emulation.setDeviceMetricsOverride", width=1500, height=1250, deviceScaleFactor=1, mobile=False
    )
    visit(page, server.url + "/costs/?period=1h", "document.querySelectorAll('svg.chart').length === 5")
    save(page, folder / "front-costs.png")


def visit(page: Page, url: str, ready: str) -> None:
    page.call("Page.navigate", url=url)
    page.wait_for(
        f"document.readyState === 'complete' && location.href.startsWith({url.split('?')[0]!r}) && ({ready})"
    )


def save(page: Page, path: Path) -> None:
    path.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
    print(f"wrote {path}")


def browser() -> AbstractContextManager[Page]:
    """Return a headless Chromium's one tab, as a context manager (the browser tests' own)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium: apt-get install -y chromium")
    return open_page(chromium)


if __name__ == "__main__":
    main()
