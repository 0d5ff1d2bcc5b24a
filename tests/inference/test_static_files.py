"""Static files through WhiteNoise with DEBUG off: from the source folders before `collectstatic`, then the
collected copies (gzip-compressed, cache headers), on the sync stack and on the ASGI one daphne runs."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.test import AsyncClient, Client, override_settings

CHAT_JS = Path(settings.BASE_DIR) / "ruvon" / "static" / "inference" / "chat.js"
URL = "/static/inference/chat.js"


def test_it_serves_a_static_file_with_debug_off() -> None:
    assert settings.DEBUG is False
    response = Client().get(URL)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == CHAT_JS.read_bytes()  # type: ignore[attr-defined]
    assert "max-age" in response["Cache-Control"]


def test_it_serves_static_files_from_the_async_stack() -> None:
    async def fetch() -> tuple[int, bytes]:
        response = await AsyncClient().get(URL)
        return response.status_code, b"".join(response.streaming_content)  # type: ignore[attr-defined]

    status, body = asyncio.run(fetch())
    assert status == 200 and body == CHAT_JS.read_bytes()


def test_it_serves_what_collectstatic_gathered_compressed(tmp_path: Path) -> None:
    with override_settings(STATIC_ROOT=tmp_path, WHITENOISE_USE_FINDERS=False):
        call_command("collectstatic", interactive=False, verbosity=0)
        assert (tmp_path / "admin" / "css" / "base.css").is_file()  # the apps' files too
        assert gzip.decompress((tmp_path / "inference" / "chat.js.gz").read_bytes()) == CHAT_JS.read_bytes()
        response = Client().get(URL, headers={"Accept-Encoding": "gzip"})
        missing = Client().get("/static/inference/no-such-file.js")
    assert response.status_code == 200 and response["Content-Encoding"] == "gzip"
    assert gzip.decompress(b"".join(response.streaming_content)) == CHAT_JS.read_bytes()  # type: ignore[attr-defined]
    assert missing.status_code == 404
