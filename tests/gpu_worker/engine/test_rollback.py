"""The scheduler takes tokens back (rejected drafts): they leave the sequence and the cache, the blocks they
alone needed return to the pool, and the sequence goes on as if they had never been there."""

from __future__ import annotations

import pytest

from gpu_worker.config import SamplingParams
from tests.gpu_worker.conftest import Peer, engine_for

PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_it_rolls_back_computed_tokens_and_frees_their_blocks(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, enable_prefix_caching=False)
    [expected] = engine.generate([[3, 4, 5]], PARAMS)
    engine.add_request("r", [3, 4, 5], PARAMS)
    while len(engine.requests["r"].seqs[0].token_ids) < 3 + 20:
        engine.step()
    seq = engine.requests["r"].seqs[0]
    # Pretend the last 12 tokens were drafts that verification rejected.
    engine.scheduler.rollback(seq, 12)
    seq.pending_token_ids.clear()
    assert seq.num_tokens == 3 + 8 and seq.num_computed_tokens <= seq.num_tokens
    assert len(seq.block_table) == engine.block_manager.blocks_needed(seq.num_tokens)
    used = len(seq.block_table)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks - used
    # The engine recomputes what it needs and samples exactly what it would have.
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.token_ids[3:] == expected.token_ids[0]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_it_refuses_to_roll_back_into_the_prompt_or_a_cached_block(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    engine.add_request("r", list(range(1, 30)), PARAMS)
    while len(engine.requests["r"].seqs[0].token_ids) < 29 + 10:
        engine.step()
    seq = engine.requests["r"].seqs[0]
    with pytest.raises(ValueError, match="prompt"):
        engine.scheduler.rollback(seq, 11)
    # Tokens 0..31 fill two blocks registered for prefix caching: taking back token 31 would rewrite one.
    with pytest.raises(RuntimeError, match="hashed block"):
        engine.scheduler.rollback(seq, seq.num_tokens - 31)
