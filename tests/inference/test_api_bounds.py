"""The API's documented bounds (issue 12): top_k up to the vocabulary, any int64 seed, integer seeds only, a
server default for max_tokens, and no U+FFFD where max_tokens cuts a character; over HTTP and the websocket."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from asgiref.sync import async_to_sync
from django.test import override_settings

from inference.transport import get_tokenizer
from tests.inference.test_websocket import HELLO, communicator, read_until, session_headers

if TYPE_CHECKING:
    from tests.conftest import ApiClient

pytestmark = [pytest.mark.usefixtures("tiny_served"), pytest.mark.django_db(transaction=True)]

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}


def _vocab() -> int:
    return get_tokenizer().vocab_size


def _error_param(response: Any) -> str | None:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error["param"]


@pytest.mark.parametrize("top_k", [2**63, 2**63 - 1, "vocab+1"])
def test_it_rejects_a_top_k_above_the_vocabulary(as_owner: ApiClient, top_k: Any) -> None:
    top_k = _vocab() + 1 if top_k == "vocab+1" else top_k
    assert _error_param(as_owner.post("/v1/completions", COMPLETION | {"top_k": top_k})) == "top_k"


@pytest.mark.parametrize("top_k", [-1, 0, 1, "vocab"])
def test_it_serves_top_k_off_or_within_the_vocabulary(as_owner: ApiClient, top_k: Any) -> None:
    top_k = _vocab() if top_k == "vocab" else top_k
    response = as_owner.post("/v1/completions", COMPLETION | {"top_k": top_k})
    assert response.status_code == 200, response.content


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 2**44 + 5, -1])
def test_it_serves_any_int64_seed_the_same_way_every_time(as_owner: ApiClient, seed: int) -> None:
    body = COMPLETION | {"seed": seed, "temperature": 1.0, "max_tokens": 8}
    first = as_owner.post("/v1/completions", body)
    second = as_owner.post("/v1/completions", body)
    assert first.status_code == second.status_code == 200, first.content
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


@pytest.mark.parametrize("seed", [1.5, 7.0, "7", True, 2**63, -(2**63) - 1])
def test_it_rejects_a_seed_that_is_not_an_int64(as_owner: ApiClient, seed: Any) -> None:
    assert _error_param(as_owner.post("/v1/completions", COMPLETION | {"seed": seed})) == "seed"


def test_it_gives_a_request_without_max_tokens_the_server_default(as_owner: ApiClient) -> None:
    body = {"model": "tiny", "messages": HELLO, "ignore_eos": True}
    with override_settings(RUVON_DEFAULT_MAX_TOKENS=5):
        response = as_owner.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.content
    assert response.json()["usage"]["completion_tokens"] == 5
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_it_drops_a_character_that_max_tokens_cut_in_half(as_owner: ApiClient) -> None:
    tokenizer = get_tokenizer()
    lead = tokenizer.encode("🎉")[0]  # the emoji's first bytes only: no character on its own
    assert tokenizer.decode([lead]) == "\ufffd"
    body = COMPLETION | {"max_tokens": 1, "temperature": 0, "logit_bias": {str(lead): 100}}
    response = as_owner.post("/v1/completions", body)
    assert response.status_code == 200, response.content
    assert response.json()["usage"]["completion_tokens"] == 1
    assert response.json()["choices"][0]["text"] == ""


def test_it_applies_the_same_seed_checks_and_default_on_the_websocket(owner: Any) -> None:
    headers = session_headers(owner.user)

    async def scenario() -> list[dict[str, Any]]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)
        replies = []
        for params in ({"seed": 1.5}, {"seed": 2**63}, {"seed": 2**63 - 1, "max_tokens": 3}, {}):
            await ws.send_json_to({"messages": HELLO, "params": params})
            replies.append((await read_until(ws, {"done", "error"}))[-1])
        await ws.disconnect()
        return replies

    with override_settings(RUVON_DEFAULT_MAX_TOKENS=4):
        bad_float, too_big, int64, default = async_to_sync(scenario)()
    assert (bad_float["type"], bad_float["param"]) == ("error", "seed")
    assert (too_big["type"], too_big["param"]) == ("error", "seed")
    assert int64["type"] == "done" and int64["usage"]["completion_tokens"] <= 3, int64
    assert default["type"] == "done" and default["usage"]["completion_tokens"] <= 4, default
