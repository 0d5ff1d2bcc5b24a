"""The prefix cache across tenants, through the API with the openai SDK: a tenant's repeated prompt is served
from cache, another tenant sending the same prompt gets no cached tokens (and so no timing signal), and a
different cache_salt separates requests within a tenant."""

from __future__ import annotations

import re
import uuid

import openai
import pytest

from tests.live_server import run_manage, shared_live_server

# About 90 tokens of random:tiny's GPT-2 vocabulary: five full KV blocks of 16 and a tail.
PROMPT = "The secret vault code of the acme corporation is 4821, and only the owner knows it. " * 5


@pytest.fixture(scope="module")
def clients() -> tuple[openai.OpenAI, openai.OpenAI]:
    """The demo tenant's client and a client of a second tenant on the same live server."""
    server = shared_live_server()
    slug = f"outsider-{uuid.uuid4().hex[:8]}"
    run_manage(server.env, "create_tenant", slug, "--slug", slug)
    key = run_manage(server.env, "create_api_key", "--tenant", slug).stdout.strip()
    assert re.fullmatch(r"rv_\S+", key), key
    base = server.url + "/v1"
    return (
        openai.OpenAI(base_url=base, api_key=server.api_key, max_retries=0),
        openai.OpenAI(base_url=base, api_key=key, max_retries=0),
    )


def _cached(client: openai.OpenAI, prompt: str, **extra: object) -> int:
    completion = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0.0, extra_body=extra or None
    )
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    return completion.usage.prompt_tokens_details.cached_tokens or 0


def test_it_never_shows_one_tenants_cached_prompt_to_another(
    clients: tuple[openai.OpenAI, openai.OpenAI],
) -> None:
    owner, outsider = clients
    prompt = f"{uuid.uuid4().hex} {PROMPT}"
    assert _cached(owner, prompt) == 0
    assert _cached(owner, prompt) >= 64  # the owner's own prompt is served from the cache
    assert _cached(outsider, prompt) == 0  # the same prompt from another tenant: no trace of the owner's
    assert _cached(outsider, prompt) >= 64  # ... and the outsider's own copy is cached for the outsider


def test_a_cache_salt_separates_requests_within_a_tenant(
    clients: tuple[openai.OpenAI, openai.OpenAI],
) -> None:
    owner, _ = clients
    prompt = f"{uuid.uuid4().hex} {PROMPT}"
    assert _cached(owner, prompt, cache_salt="alice") == 0
    assert _cached(owner, prompt, cache_salt="bob") == 0
    assert _cached(owner, prompt, cache_salt="alice") >= 64


def test_it_rejects_an_empty_cache_salt(clients: tuple[openai.OpenAI, openai.OpenAI]) -> None:
    owner, _ = clients
    with pytest.raises(openai.BadRequestError) as bad:
        owner.completions.create(model="tiny", prompt="hello", max_tokens=1, extra_body={"cache_salt": ""})
    assert bad.value.param == "cache_salt"
