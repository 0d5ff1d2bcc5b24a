"""The cost dashboard from a real run: a live server (daphne, embedded engine, fresh SQLite), two tenants
sending OpenAI requests for a few minutes, then the per-request CSV totals and screenshots of the staff and
tenant dashboards taken in headless Chromium.

python bench/cost_dashboard_demo.py --seconds 240 --images docs/images
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import itertools
import json
import math
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.live_server import LiveServer, run_manage, start_live_server  # noqa: E402

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def second_tenant(server: LiveServer) -> str:
    """Create tenant "globex" with an API key; return the key."""
    run_manage(server.env, "create_tenant", "Globex", "--slug", "globex")
    out = run_manage(server.env, "create_api_key", "--tenant", "globex", "--name", "load").stdout
    return re.search(r"rv_\S+", out).group(0)  # type: ignore[union-attr]


def load(server: LiveServer, key: str, seconds: float, rate: Any, seed: int, stats: dict[str, int]) -> None:
    """Send completions at `rate(t)` requests/s (Poisson) for `seconds`, each on its own thread."""
    rng, start, threads = random.Random(seed), time.monotonic(), []
    headers = {"Authorization": f"Bearer {key}"}

    def one(body: dict[str, Any]) -> None:
        response = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
        stats[str(response.status_code)] = stats.get(str(response.status_code), 0) + 1

    while (t := time.monotonic() - start) < seconds:
        time.sleep(rng.expovariate(rate(t)))
        prompt = [rng.randrange(50000) for _ in range(rng.randint(8, 60))]
        body = {"model": "tiny", "prompt": prompt, "max_tokens": rng.randint(8, 64), "ignore_eos": True}
        thread = threading.Thread(target=one, args=(body,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


def csv_totals(server: LiveServer, cookie: str) -> dict[str, Any]:
    """Return the totals of the staff CSV export (one row per request), by tenant and overall."""
    text = httpx.get(
        server.url + "/costs/all/export.csv?period=24h", headers={"Cookie": cookie}, timeout=60
    ).text
    rows = list(csv.DictReader(io.StringIO(text)))
    out: dict[str, Any] = {}
    for tenant, group in itertools.groupby(
        sorted(rows, key=lambda r: r["tenant"]), key=lambda r: r["tenant"]
    ):
        group = list(group)
        device = math.fsum(float(r["device_seconds"]) for r in group)
        tokens = sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in group)
        cost = sum(Decimal(r["cost_usd"]) for r in group)
        revenue = sum(Decimal(r["revenue_usd"]) for r in group)
        speeds = [float(r["tokens_per_s"]) for r in group if r["tokens_per_s"]]
        out[tenant] = {
            "requests": len(group),
            "tokens": tokens,
            "device_s": device,
            "cost_usd": float(cost),
            "revenue_usd": float(revenue),
            "usd_per_request": float(cost) / len(group),
            "usd_per_million_tokens": float(cost) * 1e6 / tokens,
            "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "mean_ttft_s": sum(float(r["ttft_s"]) for r in group if r["ttft_s"]) / len(group),
        }
    return out


def engine_metrics(server: LiveServer) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    wanted = ("ruvon:step_time_seconds_sum", "ruvon:generation_tokens_total", "ruvon:prompt_tokens_total",
              "ruvon:time_to_first_token_seconds_count", "ruvon:step_time_seconds_count")  # fmt: skip
    return {
        name: float(m.group(1))
        for name in wanted
        if (m := re.search(re.escape(name) + r"\{[^}]*\} (\S+)", text))
    }


def screenshots(server: LiveServer, cookie: str, shots: dict[str, str], folder: Path) -> None:
    """Open each path in headless Chromium (signed in with `cookie`) and save a full-page PNG."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium: apt-get install -y chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tempfile.mkdtemp(prefix="ruvon-shot-")
    cmd = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--remote-debugging-port={port}",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws_url = _page_websocket(port)
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            ids = itertools.count(1)

            def call(method: str, **params: Any) -> dict[str, Any]:
                call_id = next(ids)
                ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=60))
                    if message.get("id") == call_id:
                        return message.get("result", {})

            name, value = cookie.split("=", 1)
            call("Network.enable")
            call("Network.setCookie", name=name, value=value, url=server.url)
            call(
                "Emulation.setDeviceMetricsOverride",
                width=1500,
                height=1000,
                deviceScaleFactor=1,
                mobile=False,
            )
            for file, path in shots.items():
                call("Page.enable")
                call("Page.navigate", url=server.url + path)
                time.sleep(3)  # the page is server-rendered; this covers layout and fonts
                height = call("Runtime.evaluate", expression="document.body.scrollHeight", returnByValue=True)
                clip = {"x": 0, "y": 0, "width": 1500, "height": height["result"]["value"], "scale": 1}
                shot = call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
                (folder / file).write_bytes(base64.b64decode(shot["data"]))
                print(f"wrote {folder / file}")
    finally:
        browser.terminate()
        browser.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


def _page_websocket(port: int) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        except (httpx.HTTPError, StopIteration):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    parser.add_argument("--out", type=Path, default=None, help="write the measured totals here as JSON")
    args = parser.parse_args()
    server = start_live_server({"RUVON_NUM_BLOCKS": "256"})
    try:
        globex_key = second_tenant(server)
        stats: dict[str, int] = {}
        # Demo's traffic swells and ebbs over the run; Globex sends a steady trickle with a burst in the middle.
        demo_rate = lambda t: 0.5 + 2.5 * math.sin(math.pi * t / args.seconds) ** 2  # noqa: E731
        globex_rate = lambda t: 4.0 if abs(t - args.seconds / 2) < 20 else 0.5  # noqa: E731
        threads = [
            threading.Thread(target=load, args=(server, server.api_key, args.seconds, demo_rate, 1, stats)),
            threading.Thread(target=load, args=(server, globex_key, args.seconds, globex_rate, 2, stats)),
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        time.sleep(2)  # the usage writer's last records
        cookie = server.login_cookie()
        result = {"wall_s": wall, "http_status": stats, "by_tenant": csv_totals(server, cookie)}
        result["engine"] = engine_metrics(server)
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        args.images.mkdir(parents=True, exist_ok=True)
        shots = {
            "cost-dashboard-staff.png": "/costs/all/?period=1h",
            "cost-dashboard-tenant.png": "/costs/?period=1h",
        }
        screenshots(server, cookie, shots, args.images)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
