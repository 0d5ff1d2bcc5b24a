"""Owns the paged KV cache's blocks: free list, ref counts, block tables, and prefix caching by hash chain.

A block holds `block_size` consecutive tokens of one sequence. A full block's identity is a SHA-256 chain
over every token before and in it, rooted in the request's isolation key (tenant, cache_salt, adapter), so
two sequences share blocks only when they have the same prefix *and* the same root: one tenant's cached
prompt is invisible to another (no hit, no cached_tokens, no timing difference), and a collision cannot be
crafted. Freed blocks keep their hash and stay findable until they are reused, oldest-freed first (LRU).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

from gpu_worker.sequence import Sequence

BlockHash = bytes


def isolation_root(*parts: str) -> BlockHash:
    """Return the hash chain's root for an isolation key made of `parts` (e.g. tenant, cache_salt)."""
    key = "\x00".join(parts).encode()
    return hashlib.sha256(b"ruvon-prefix-cache-v1\x00" + key).digest()


def chain_hash(prev: BlockHash, tokens: Seq[int]) -> BlockHash:
    """Return the hash of a full block given its predecessor's hash (or the root) and its own tokens."""
    return hashlib.sha256(prev + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # hash -> block id
        # Free blocks, oldest freed first; an OrderedDict gives O(1) removal of a block revived by a hit.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_queries = 0  # tokens looked up
        self.num_prefix_hits = 0  # tokens found

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        """Return the fraction of blocks held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _hashes(self, seq: Sequence, count: int) -> list[BlockHash]:
        """Return the hash chain over the sequence's first `count` full blocks; each block is hashed once in
        the sequence's life (the chain is kept on the sequence, as its tokens never change)."""
        hashes = seq.block_hashes
        prev = hashes[-1] if hashes else seq.request.cache_root
        size = self.block_size
        for i in range(len(hashes), count):
            prev = chain_hash(prev, seq.token_ids[i * size : (i + 1) * size])
            hashes.append(prev)
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Return the ids of cached blocks that hold a prefix of this (not yet allocated) sequence."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        # Leave at least one token to compute: its logits give the next token.
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] | None = None) -> bool:
        """Return whether the sequence can hold `num_new_tokens` more tokens (using a matched prefix)."""
        prefix = prefix or []
        have = len(seq.block_table) or len(prefix)
        computed = seq.num_computed_tokens or len(prefix) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - have
        revived = sum(1 for b in prefix if self.ref_counts[b] == 0)
        return need + revived <= self.num_free_blocks

    # ---- mutations -----------------------------------------------------------------------------
    def allocate_prefix(self, seq: Sequence, prefix: list[int]) -> int:
        """Give a new sequence the matched prefix blocks; return how many tokens it may skip computing."""
        self.num_prefix_queries += seq.num_tokens
        for block in prefix:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        cached_tokens = len(prefix) * self.block_size
        self.num_prefix_hits += cached_tokens
        seq.num_computed_tokens = cached_tokens
        seq.num_hashed_blocks = len(prefix)
        return cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks until the sequence can hold its computed tokens plus `num_new_tokens`."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("allocate() without can_allocate(): scheduler bug")
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.block_hash[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]
            self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of the sequence's full, computed blocks so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        start = seq.num_hashed_blocks
        if full <= start:  # no block filled up since the last commit (most decode steps)
            return
        hashes = self._hashes(seq, full)
        for i in range(start, full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:  # a shared prefix block, registered already
                continue
            self.block_hash[block] = hashes[i]
            self.cached.setdefault(hashes[i], block)
        seq.num_hashed_blocks = max(start, full)

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past what the sequence's tokens need (after a rollback of rejected tokens).

        The tokens taken back must not reach into a block that is registered for prefix caching: commit()
        runs only on tokens that stay."""
        if seq.num_tokens < seq.num_hashed_blocks * self.block_size:
            raise RuntimeError("trim() into a hashed block: tokens were committed before they were accepted")
        del seq.block_hashes[seq.num_tokens // self.block_size :]
        keep = self.blocks_needed(seq.num_tokens)
        for block in reversed(seq.block_table[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        del seq.block_table[keep:]

    def free_seq(self, seq: Sequence) -> None:
        """Release the sequence's blocks; unreferenced ones return to the free list (hash kept for reuse)."""
        # Reversed: a sequence's last blocks are the least likely to be shared, so evict them first.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def kv_waste(self, seqs: list[Sequence]) -> float:
        """Return allocated-but-unused slots ÷ allocated slots over the given live sequences."""
        allocated = sum(len(s.block_table) for s in seqs) * self.block_size
        if allocated == 0:
            return 0.0
        used = sum(min(s.num_computed_tokens, len(s.block_table) * self.block_size) for s in seqs)
        return (allocated - used) / allocated
