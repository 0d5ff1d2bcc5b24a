"""Property tests of the paged KV allocator: no block owned twice, no leak, prefix reuse, clean preemption."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.config import SamplingParams
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.sequence import Request, Sequence

BLOCK = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    request = Request(f"r{seq_id}", list(tokens), SamplingParams())
    seq = Sequence(seq_id, request, 0, list(tokens))
    request.seqs.append(seq)
    return seq


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    owners = Counter(b for s in live for b in s.block_table)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == owners.get(block, 0)
        assert (block in bm.free) == (bm.ref_counts[block] == 0)
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"


def admit(bm: BlockManager, seq: Sequence) -> bool:
    prefix = bm.match_prefix(seq)
    n = seq.num_tokens - len(prefix) * BLOCK
    if not bm.can_allocate(seq, n, prefix):
        return False
    bm.allocate_prefix(seq, prefix)
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)
    return True


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "grow", "free"]),
        st.integers(0, 50),
        st.lists(st.integers(0, 3), min_size=1, max_size=20),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_it_never_double_owns_or_leaks(script: list[tuple[str, int, list[int]]]) -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    live: list[Sequence] = []
    for i, (op, pick, tokens) in enumerate(script):
        if op == "add":
            seq = make_seq(i, tokens)
            if admit(bm, seq):
                live.append(seq)
        elif op == "grow" and live:
            seq = live[pick % len(live)]
            seq.token_ids.append(tokens[0])
            if bm.can_allocate(seq, 1):
                bm.allocate(seq, 1)
                seq.num_computed_tokens += 1
                bm.commit(seq)
            else:  # preemption: all its blocks go back
                bm.free_seq(seq)
                live.remove(seq)
        elif op == "free" and live:
            bm.free_seq(live.pop(pick % len(live)))
        check_invariants(bm, live)
    for seq in live:
        bm.free_seq(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_it_reuses_prefix_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    prompt = list(range(10))  # two full blocks and a partial one
    first = make_seq(0, prompt)
    assert admit(bm, first)
    second = make_seq(1, prompt + [99])
    prefix = bm.match_prefix(second)
    assert prefix == first.block_table[:2]
    assert admit(bm, second)
    assert second.block_table[:2] == first.block_table[:2]
    assert bm.ref_counts[first.block_table[0]] == 2
    assert bm.num_prefix_hits == 2 * BLOCK


def test_it_finds_freed_blocks_until_they_are_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    prompt = list(range(9))
    first = make_seq(0, prompt)
    assert admit(bm, first)
    kept = first.block_table[:2]
    bm.free_seq(first)
    assert bm.num_free_blocks == 4
    again = make_seq(1, prompt)
    assert bm.match_prefix(again) == kept
    # A workload that needs every block evicts the cached ones; they must no longer match.
    hog = make_seq(2, [7] * 16)
    assert admit(bm, hog)
    assert bm.match_prefix(make_seq(3, prompt)) == []


def test_it_leaves_one_token_to_compute_on_a_full_hit() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    prompt = list(range(8))  # exactly two blocks
    assert admit(bm, make_seq(0, prompt))
    # The last token's logits are needed, so at most one block may come from the cache.
    assert len(bm.match_prefix(make_seq(1, prompt))) == 1


def test_it_reports_kv_waste() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    seq = make_seq(0, [1, 2, 3, 4, 5])
    assert admit(bm, seq)
    assert bm.kv_waste([seq]) == (8 - 5) / 8
