"""ORACLE+DRAFT (the benches' controlled acceptance at a draft model's real cost): a far draft model drafts
k tokens for every sequence, the oracle's tokens replace them, greedy output stays the target's, and both KV
pools are whole at the end."""

from __future__ import annotations

import pytest

from gpu_worker.config import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.spec.draft_model import DraftModelProposer
from gpu_worker.spec.oracle import OracleDraftProposer, OracleProposer
from tests.gpu_worker.conftest import Peer, engine_for, make_peer

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS: list[list[int]] = [[5, 6, 7], list(range(100, 130)), [42, 43, 42, 43, 42], [900, 17]]
K = 3


@pytest.fixture(scope="module")
def far_draft(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    """A tiny GPT-2 with other random weights: its own drafts are rarely the target's."""
    return make_peer("tiny", tmp_path_factory.mktemp("draft"), seed=1)


def _oracle_draft(tiny_gpt2: Peer, far_draft: Peer, alpha: float) -> tuple[LLMEngine, list[list[int]]]:
    """Return an engine speculating with ORACLE+DRAFT at `alpha`, and the baseline's greedy outputs."""
    expected = [o.token_ids[0] for o in engine_for(tiny_gpt2).generate(PROMPTS, GREEDY)]
    engine = engine_for(tiny_gpt2, speculative="ngram", num_speculative_tokens=K)
    continuations = {tuple(p): out for p, out in zip(PROMPTS, expected, strict=True)}
    draft = DraftModelProposer(
        str(far_draft.path),
        num_blocks=64,
        block_size=engine.config.block_size,
        dtype=engine.dtype,
        device=engine.device,
        target_vocab=engine.model_config.vocab_size,
        max_model_len=engine.max_model_len,
    )
    oracle = OracleProposer(continuations, alpha, engine.model_config.vocab_size)
    engine.proposer = OracleDraftProposer(oracle, draft)
    return engine, expected


def _draft(engine: LLMEngine) -> DraftModelProposer:
    assert isinstance(engine.proposer, OracleDraftProposer)
    return engine.proposer.draft


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_greedy_output_is_the_targets_and_both_pools_end_free(
    tiny_gpt2: Peer, far_draft: Peer, alpha: float
) -> None:
    engine, expected = _oracle_draft(tiny_gpt2, far_draft, alpha)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids[0] for o in outs] == expected
    stats = engine.stats()
    drafted, accepted = stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]
    assert drafted > 0
    # The oracle's tokens were verified, not the far draft's: all accepted at 1, none at 0, some between.
    assert accepted == {0.0: 0, 1.0: drafted}.get(alpha, accepted)
    assert 0 < accepted < drafted or alpha in (0.0, 1.0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    draft = _draft(engine)
    assert draft.num_free_blocks == draft.num_blocks and not draft.shadows


def test_the_draft_model_pays_for_every_proposal(tiny_gpt2: Peer, far_draft: Peer) -> None:
    """After each step the draft's shadow holds the target's tokens as of its last proposal, then up to k
    tokens of its own, computed through all but the last: it ran its forward steps."""
    engine, _ = _oracle_draft(tiny_gpt2, far_draft, 0.6)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    draft, full = _draft(engine), 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            shadow = draft.shadows.get(seq.seq_id)
            if shadow is None:
                continue
            synced = draft.synced[seq.seq_id]
            assert shadow.token_ids[:synced] == seq.token_ids[:synced]
            assert 1 <= shadow.num_tokens - synced <= K
            assert shadow.num_computed_tokens == shadow.num_tokens - 1
            full += shadow.num_tokens - synced == K
    assert full > 0
    assert draft.num_free_blocks == draft.num_blocks and not draft.shadows
