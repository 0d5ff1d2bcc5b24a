"""The prefix cache is keyed by tenant and cache_salt: one tenant's cached prompt is invisible to another
(no hit, no cached tokens), unless the engine is told to share across tenants."""

from __future__ import annotations

from gpu_worker.config import SamplingParams
from gpu_worker.engine.block_manager import chain_hash, isolation_root
from gpu_worker.engine.llm_engine import LLMEngine
from tests.gpu_worker.conftest import Peer, engine_for

PROMPT = list(range(1, 70))  # four full blocks of 16 and a tail
PARAMS = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


def _cached_tokens(engine: LLMEngine, rid: str, **kwargs: object) -> int:
    engine.add_request(rid, PROMPT, PARAMS, **kwargs)  # type: ignore[arg-type]
    cached = None
    for out in engine.stream():
        if out.request_id == rid and out.finished:
            cached = out.metrics.num_cached_tokens
    assert cached is not None
    return cached


def test_it_shares_cached_blocks_within_a_tenant_only(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    assert _cached_tokens(engine, "a1", tenant="acme") == 0
    assert _cached_tokens(engine, "a2", tenant="acme") == 64
    assert _cached_tokens(engine, "g1", tenant="globex") == 0  # the same prompt, another tenant
    assert _cached_tokens(engine, "g2", tenant="globex") == 64


def test_it_separates_requests_with_different_cache_salts(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    assert _cached_tokens(engine, "s1", tenant="acme", cache_salt="alice") == 0
    assert _cached_tokens(engine, "s2", tenant="acme", cache_salt="bob") == 0
    assert _cached_tokens(engine, "s3", tenant="acme") == 0  # no salt is a salt of its own
    assert _cached_tokens(engine, "s4", tenant="acme", cache_salt="alice") == 64


def test_it_shares_across_tenants_only_when_configured(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, prefix_cache_scope="global")
    assert _cached_tokens(engine, "a", tenant="acme") == 0
    assert _cached_tokens(engine, "g", tenant="globex") == 64


def test_the_chain_hash_depends_on_the_root_and_every_token() -> None:
    tokens = list(range(16))
    acme, globex = isolation_root("scope=acme", "salt="), isolation_root("scope=globex", "salt=")
    assert chain_hash(acme, tokens) != chain_hash(globex, tokens)
    assert chain_hash(acme, tokens) != chain_hash(acme, [*tokens[:-1], 99])
    assert chain_hash(acme, tokens) == chain_hash(acme, list(tokens))
    # The parts are separated, so ("a", "bc") and ("ab", "c") are different keys.
    assert isolation_root("a", "bc") != isolation_root("ab", "c")
    assert len(chain_hash(acme, tokens)) == 32  # SHA-256
