"""Decides which sequences run each step and owns their status: continuous batching under a token budget.

Every sequence simply has tokens whose keys/values are not yet cached. A step gives each running sequence
as many of those as the budget allows (1 for a decode, a chunk for a prefill), so prefill chunks and
decodes share one batch. When blocks run out the newest running sequence is preempted and later
recomputed. Waiting sequences are admitted by weighted fair share across tenants.

When every running sequence decodes and nothing waits, the scheduler plans decode launches instead
(schedule_launch): several tokens per sequence computed on the device in one go, their KV slots allocated
ahead (lookahead slots). Tokens a sequence does not keep are taken back with rollback().

A request with a LoRA adapter is admitted only once its adapter can take a slot (AdapterManager.ready):
until then it waits without holding up the requests behind it. A running sequence pins its adapter's
slot, so at most max_loras distinct adapters run at once.

Speculative decoding's drafts are ordinary tokens here: add_drafts() appends k of them to a caught-up
sequence, so the next schedule() gives it k + 1 tokens; take_drafts() then takes back the rejected ones and
hands over the accepted ones. Drafts are never committed to the prefix cache, never split across steps (a
sequence that cannot get all of them this step, or whose blocks run short, drops them) and never survive a
preemption.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpu_worker.config import EngineConfig
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.errors import CapacityError
from gpu_worker.lora.manager import AdapterManager
from gpu_worker.sequence import Request, ScheduledBatch, Sequence, SequenceStatus

if TYPE_CHECKING:
    import torch

    from gpu_worker.runner.model_runner import DecodeLaunch


@dataclass
class LaunchPlan:
    """Decode steps to chain on the device: sequence i feeds positions first[i]..last[i] (blocks allocated)."""

    seqs: list[Sequence]
    first: list[int]
    last: list[int]
    steps: int


class Scheduler:
    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, adapters: AdapterManager | None = None
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapters = adapters  # None: LoRA is off
        self.waiting: dict[str, deque[Sequence]] = {}  # tenant -> its queue, in arrival order
        self.running: list[Sequence] = []  # oldest first
        self.held: dict[int, list[Sequence]] = {}  # first seq id -> siblings waiting for its prefill
        self.service: dict[str, float] = {}  # tenant -> weighted tokens admitted (fair-share clock)
        self.num_preemptions = 0

    # ---- queue changes -------------------------------------------------------------------------
    def check_capacity(self, tokens: int, held: Iterable[Request] = ()) -> None:
        """Raise CapacityError if a request of up to `tokens` tokens would overfill the waiting queue
        (max_waiting requests, max_waiting_tokens tokens; an empty queue takes any one request). `held`:
        requests the engine has taken but not queued here yet, which count as waiting."""
        held = list(held)
        waiting = self.num_waiting + sum(len(r.seqs) for r in held)
        if waiting >= self.config.max_waiting:
            raise CapacityError(f"the engine's queue is full ({waiting} requests waiting); retry shortly")
        limit = self.config.max_waiting_tokens
        waiting_tokens = self.waiting_tokens + sum(r.max_total_tokens * len(r.seqs) for r in held)
        if waiting and limit is not None and waiting_tokens + tokens > limit:
            raise CapacityError(
                f"the engine's queue is full ({waiting_tokens} tokens waiting); retry shortly"
            )

    def add_request(self, request: Request) -> None:
        first, *siblings = request.seqs
        self._enqueue(first)
        if siblings:
            # Siblings wait for the first choice's prompt to be cached, then reuse its blocks.
            self.held[first.seq_id] = siblings

    def _enqueue(self, seq: Sequence, front: bool = False) -> None:
        tenant = seq.request.tenant
        queue = self.waiting.setdefault(tenant, deque())
        if tenant not in self.service:
            # A newcomer starts at the least-served active tenant's clock: no banked credit, no debt.
            active = [self.service[t] for t, q in self.waiting.items() if q and t in self.service]
            self.service[tenant] = min(active, default=0.0)
        seq.status = SequenceStatus.WAITING
        queue.appendleft(seq) if front else queue.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark a sequence finished, free its blocks, and drop it from every queue."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
            self._release_adapter(seq)
        queue = self.waiting.get(seq.request.tenant)
        if queue and seq in queue:
            queue.remove(seq)
        self.block_manager.free_seq(seq)
        for sibling in self.held.pop(seq.seq_id, []):
            self._enqueue(sibling, front=True)

    def abort_request(self, request: Request, reason: str = "abort") -> None:
        for seq in request.seqs:
            self.held.pop(seq.seq_id, None)
        for seq in request.seqs:
            self.finish(seq, reason)

    @property
    def num_waiting(self) -> int:
        held = sum(len(v) for v in self.held.values())
        return sum(len(q) for q in self.waiting.values()) + held

    @property
    def waiting_tokens(self) -> int:
        """Return the token bounds (prompt + max completion) of the waiting sequences."""
        held = (seq for seqs in self.held.values() for seq in seqs)
        queued = (seq for queue in self.waiting.values() for seq in queue)
        return sum(seq.request.max_total_tokens for seq in (*queued, *held))

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    # ---- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        bm, size = self.block_manager, self.block_manager.block_size
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if seq.num_drafts and (
                seq.num_uncomputed_tokens > budget or not bm.can_allocate(seq, seq.num_uncomputed_tokens)
            ):
                self.drop_drafts(seq)
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            # Most steps' decodes fit the blocks they hold: nothing to check or allocate for them.
            if seq.num_computed_tokens + n > len(seq.block_table) * size:
                while not bm.can_allocate(seq, n):
                    preempted = True
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                bm.allocate(seq, n)
            batch.add(seq, n)
            budget -= n
        if not preempted:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        now = time.time()
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self._peek_fair()
            if seq is None:
                return
            # Prompt logprobs need every prompt position computed, so such requests skip the prefix cache.
            wants_prompt_logprobs = seq.params.prompt_logprobs is not None
            prefix = [] if wants_prompt_logprobs else self.block_manager.match_prefix(seq)
            n = min(seq.num_tokens - len(prefix) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(seq, n, prefix):
                return  # head of the fair queue must wait for blocks; don't let others jump it
            tenant = seq.request.tenant
            self.waiting[tenant].remove(seq)
            cached = self.block_manager.allocate_prefix(seq, prefix)
            self.block_manager.allocate(seq, n)
            self._acquire_adapter(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            metrics = seq.request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.num_cached_tokens = cached
            self.service[tenant] += n / seq.request.weight
            batch.add(seq, n)
            budget -= n

    def _peek_fair(self) -> Sequence | None:
        """Return the first sequence that can run now (its adapter, if any, can take a slot) in the waiting
        queue of the tenant with the least weighted service so far."""
        best: Sequence | None = None
        best_key: tuple[float, float] | None = None
        for tenant, queue in self.waiting.items():
            seq = next((s for s in queue if self._adapter_ready(s)), None)
            if seq is None:
                continue
            key = (self.service[tenant], seq.request.metrics.arrival_time)
            if best_key is None or key < best_key:
                best, best_key = seq, key
        return best

    def _adapter_ready(self, seq: Sequence) -> bool:
        adapter = seq.request.adapter
        return adapter is None or (self.adapters is not None and self.adapters.ready(adapter))

    def _acquire_adapter(self, seq: Sequence) -> None:
        if seq.request.adapter is not None and self.adapters is not None:
            seq.lora_slot = self.adapters.acquire(seq.request.adapter)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0 and self.adapters is not None:
            self.adapters.release(seq.lora_slot)
        seq.lora_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first in line to be recomputed."""
        self.drop_drafts(seq)
        self.running.remove(seq)
        self._release_adapter(seq)
        self.block_manager.free_seq(seq)
        self.num_preemptions += 1
        self._enqueue(seq, front=True)

    def postprocess(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance computed counts and cache hashes; return the sequences that now need a new token."""
        ready: list[Sequence] = []
        held = self.held
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += n
            if not seq.num_drafts:  # drafts are committed once accepted (take_drafts, then advance)
                self.block_manager.commit(seq)
            if seq.num_computed_tokens == len(seq.token_ids):
                ready.append(seq)
                if held and seq.seq_id in held and seq.num_computed_tokens >= seq.num_prompt_tokens:
                    for sibling in self.held.pop(seq.seq_id):
                        self._enqueue(sibling, front=True)
        return ready

    def advance(self, seq: Sequence, num_tokens: int) -> None:
        """Count `num_tokens` more of a live sequence's tokens as computed and register its full blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        seq.num_computed_tokens += num_tokens
        self.block_manager.commit(seq)

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Take back a sequence's last `num_tokens` tokens (e.g. rejected drafts): they leave the sequence
        and, where computed, the cache; blocks they alone needed return to the pool. The new last token
        counts as uncomputed, so the next step feeds it and samples what follows it (a verifier that appends
        its own next token at once can count the one before back with advance())."""
        if num_tokens <= 0 or seq.is_finished:
            return
        if num_tokens > seq.num_output_tokens:
            raise ValueError("rollback() into the prompt")
        keep = seq.num_tokens - num_tokens
        del seq.token_ids[keep:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, keep - 1)
        self.block_manager.trim(seq)

    # ---- drafts (speculative decoding) ----------------------------------------------------------
    def add_drafts(self, seq: Sequence, tokens: list[int], probs: torch.Tensor | None = None) -> None:
        """Append draft tokens (and their draft distributions) to a caught-up running sequence."""
        if seq.num_drafts or seq.num_uncomputed_tokens != 1 or seq.status is not SequenceStatus.RUNNING:
            raise RuntimeError("add_drafts() on a sequence that is not caught up: engine bug")
        if seq.num_tokens + len(tokens) >= seq.request.max_total_tokens:
            raise RuntimeError("drafts past the request's token bound: engine bug")
        seq.token_ids.extend(tokens)
        seq.num_drafts = len(tokens)
        seq.draft_probs = probs

    def drop_drafts(self, seq: Sequence) -> None:
        """Take back all of a sequence's drafts unverified."""
        if seq.num_drafts:
            k, seq.num_drafts, seq.draft_probs = seq.num_drafts, 0, None
            self.rollback(seq, k)

    def take_drafts(self, seq: Sequence, num_accepted: int) -> list[int]:
        """After verification: take back the rejected drafts (and their blocks) and return the accepted ones,
        which leave token_ids too; the caller appends them again through output processing, with the token
        verification sampled after them, then advance()s past those it appended (their KV is cached)."""
        k, seq.num_drafts, seq.draft_probs = seq.num_drafts, 0, None
        self.rollback(seq, k - num_accepted)
        keep = seq.num_tokens - num_accepted
        accepted = seq.token_ids[keep:]
        del seq.token_ids[keep:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, keep - 1)
        return accepted

    # ---- decode launches -----------------------------------------------------------------------
    def can_launch_decodes(self) -> bool:
        """Whether the next step may be a decode launch: all running sequences decode, none waits, and none
        needs host-side sampling state (logprobs to read back, penalties over its output, stops still banned
        by min_tokens)."""
        if self.num_waiting or not self.running:
            return False
        for s in self.running:
            params = s.request.params
            if len(s.token_ids) - s.num_computed_tokens != 1 or not params.device_only:
                return False
            if params.min_tokens and s.num_output_tokens < params.min_tokens:
                return False
        return True

    def schedule_launch(self, steps: int, prev: DecodeLaunch | None) -> LaunchPlan | None:
        """Plan `steps` decode steps per running sequence after `prev` (if that is still in flight), allocating
        the blocks they write; None if blocks run short (an ordinary step then preempts) or nothing is left."""
        plan = LaunchPlan([], [], [], steps)
        for seq in self.running:
            in_flight = 0
            if prev is not None:
                if seq.seq_id not in prev.rows:
                    return None
                in_flight = prev.steps
            start = seq.num_computed_tokens + in_flight
            # The request's final token is sampled at position max_total - 2 and never fed back.
            end = seq.request.max_total_tokens - 2
            if start > end:
                continue  # `prev` already samples its last token
            stop = min(start + steps - 1, end)
            if stop + 1 > len(seq.block_table) * self.block_manager.block_size:
                need = stop + 1 - seq.num_computed_tokens
                if not self.block_manager.can_allocate(seq, need):
                    return None
                self.block_manager.allocate(seq, need)
            plan.seqs.append(seq)
            plan.first.append(start)
            plan.last.append(stop)
        return plan if plan.seqs else None
