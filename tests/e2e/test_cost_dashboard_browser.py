"""The cost dashboard in a real headless Chromium against the live server: after some API requests the staff
and tenant pages show their five charts at a visible size, and the tiles count the requests."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.test_chat_page import CHROMIUM, Page, page  # noqa: F401 (the fixture)
from tests.live_server import shared_live_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")]

CHARTS_DRAWN = (
    "Array.from(document.querySelectorAll('svg.chart'))"
    ".filter(svg => svg.getBoundingClientRect().width > 200 && svg.querySelector('path')).length"
)


def test_it_draws_the_dashboards_charts_in_a_browser(page: Page) -> None:  # noqa: F811
    server = shared_live_server()
    for i in range(3):
        response = httpx.post(
            server.url + "/v1/completions",
            json={"model": "tiny", "prompt": [1, 2, 3 + i], "max_tokens": 4, "ignore_eos": True},
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=60,
        )
        assert response.status_code == 200
    name, value = server.login_cookie().split("=", 1)
    page.call("Network.enable")
    page.call("Network.setCookie", name=name, value=value, url=server.url)
    for path, staff in (("/costs/all/?period=1h", True), ("/costs/?period=1h", False)):
        page.call("Page.navigate", url=server.url + path)
        assert page.wait_for(f"document.readyState === 'complete' && {CHARTS_DRAWN} === 5")
        # The first tile is the request count.
        assert page.js("document.querySelector('.summary .label').innerText.toLowerCase()") == "requests"
        assert int(page.js("document.querySelector('.summary .value').innerText.replace(/,/g, '')")) >= 3
        assert ("Margin" in page.js("document.body.innerText")) == staff
