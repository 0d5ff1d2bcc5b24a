"""Turns a scheduled batch into flat tensors, runs the model, samples on the device, and syncs once.

Decode-only work has a second path, launch_decode(): several decode steps chained on the device (each step's
sampled tokens are the next step's inputs), queued without waiting, and read back later by collect().
"""

from __future__ import annotations

import itertools
import time
from array import array
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from gpu_worker.layers.context import AttentionMetadata, LoRAMetadata
from gpu_worker.models.base import CausalLM
from gpu_worker.runner.cuda_graphs import DecodeGraphs
from gpu_worker.runner.input_batch import InputBatch
from gpu_worker.runner.kv_cache import allocate_kv_cache
from gpu_worker.runner.rejection_sampler import first_rejections, rejection_sample, target_probs
from gpu_worker.runner.sampler import apply_penalties_and_bias, needs_processing, sample, top_logprobs
from gpu_worker.sequence import ScheduledBatch, Sequence

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen logprob, [(token id, logprob), ...])
# A step's rows before packing: ids, positions, slots, query starts, context lengths, sampled rows, sampled
# sequences, rows per sampled sequence, prompt-logprob rows (see FlatBatch).
_Rows = tuple[
    list[int],
    list[int],
    list[int],
    Seq[int],
    list[int],
    Seq[int],
    list[Sequence],
    list[int],
    list[tuple[Sequence, int, int, int]],
]


@dataclass
class StepResult:
    """Host-side results of one step, for the sequences that produced a new token."""

    token_ids: list[int]
    # Per sampled sequence: (chosen logprob, [(token id, logprob), ...]) when its request asked for logprobs.
    logprobs: list[Logprob | None]
    # Per prompt-logprob row: (seq, first prompt position, [(chosen lp, top list)]).
    prompt_logprobs: list[tuple[Sequence, int, list[Logprob]]]
    # Per sampled sequence, when the step verified drafts: how many of its drafts were accepted (they come
    # before token_ids[i]) and their target logprobs. Empty when no sequence of the step had drafts.
    num_accepted: list[int] = field(default_factory=list)
    draft_logprobs: list[list[Logprob | None]] = field(default_factory=list)


@dataclass
class FlatBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] index into T of each sequence's last token, for caught-up seqs
    sample_seqs: list[Sequence]
    rows_per_seq: list[int]  # [S] sampled rows of each sample_seqs entry: its drafts + 1
    prompt_rows: list[tuple[Sequence, int, int, int]]  # (seq, flat start, first position, count)


@dataclass
class DecodeLaunch:
    """Decode steps queued on the device for a fixed set of sequences; collect() reads their tokens back."""

    seqs: list[Sequence]
    steps: int
    valid: list[int]  # per sequence: how many of the steps it may use (the rest pass its last position)
    rows: dict[int, int]  # seq_id -> row, for the next launch to pick its input tokens from ours
    tokens: torch.Tensor  # [steps, S] sampled ids, on the device
    host: torch.Tensor  # [steps, S] their host copy, complete once `done` has fired
    done: torch.cuda.Event | None
    started: float  # perf_counter() when it was queued


def chained_decode_steps(
    ids: torch.Tensor,  # [B] each sequence's first input token
    first: torch.Tensor,  # [B] int64 its first position
    last: torch.Tensor,  # [B] int64 its last useful position (a padded row: -1)
    block_tables: torch.Tensor,  # [B, W] int32
    steps: int,
    block_size: int,
    forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
    pick: Callable[[torch.Tensor], torch.Tensor],
    lora_slots: torch.Tensor | None = None,  # [B] int32 each row's adapter slot (-1: none); None: no adapters
) -> torch.Tensor:  # [steps, B] int64
    """Run `steps` decode steps where each step's picked tokens are the next step's inputs, all on the device.

    A row past its last position recomputes that position and stores nothing (slot -1); its tokens are
    dropped later. Nothing here reads a value back to the host, so it can be captured in a CUDA graph.
    """
    batch = ids.shape[0]
    tokens = torch.empty(steps, batch, dtype=torch.int64, device=ids.device)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=ids.device)
    lora = None if lora_slots is None else LoRAMetadata(query_start_loc, lora_slots)
    for j in range(steps):
        wanted = first + j
        positions = torch.minimum(wanted, last).clamp_(min=0)
        blocks = block_tables.gather(1, (positions // block_size)[:, None]).squeeze(1)
        slots = torch.where(wanted <= last, blocks * block_size + positions % block_size, -1)
        metadata = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=query_start_loc,
            context_lens=(positions + 1).int(),
            block_tables=block_tables,
            max_query_len=1,
            max_context_len=block_tables.shape[1] * block_size,  # an upper bound; decode reads context_lens
            lora=lora,
        )
        ids = pick(forward(ids, positions, metadata))
        tokens[j] = ids
    return tokens


def padded_tables(seqs: list[Sequence], width: int) -> list[int]:
    """Return the sequences' block tables flattened, each padded with block 0 to `width` entries."""
    flat: list[int] = []
    padding = [0] * width
    for seq in seqs:
        table = seq.block_table
        flat += table
        flat += padding[: width - len(table)]
    return flat


def int64_tensor(values: Iterable[int]) -> torch.Tensor:
    """Return a CPU int64 tensor of the values (through an array: several times faster than torch.tensor on a
    list of Python ints, which a step's inputs are)."""
    packed = array("q", values)
    return torch.frombuffer(packed, dtype=torch.int64) if packed else torch.empty(0, dtype=torch.int64)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        cuda_graph_max_batch: int = 0,  # 0: run eagerly
        launch_steps: int = 0,  # capture greedy launches of this many steps up front (0: none)
        lora: bool = False,  # the model serves LoRA adapters (its graphs read each row's slot)
        eos_ids: frozenset[int] = frozenset(),  # the stops min_tokens bans beside a request's stop_token_ids
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.input_batch = InputBatch(self.vocab_size, device, eos_ids=eos_ids)
        self.kv_cache = allocate_kv_cache(model, num_blocks, block_size, dtype, device)
        self.graphs: DecodeGraphs | None = None
        self.graph_max_batch = cuda_graph_max_batch  # what a draft model's runner beside this one takes
        if device.type == "cuda":
            from kernels.backend import cuda_backend

            model.context.backend = cuda_backend()
            if cuda_graph_max_batch > 0:
                max_blocks = -(-max_model_len // block_size)
                self.graphs = DecodeGraphs(model, cuda_graph_max_batch, max_blocks, device, lora=lora)
                self.graphs.capture()
                self.graphs.launch_body = self._greedy_launch_body
                if launch_steps:
                    self.graphs.capture_launches(launch_steps)

    def prepare(self, batch: ScheduledBatch) -> FlatBatch:
        decode = self._decode_rows(batch)
        rows = decode if decode is not None else self._rows(batch)
        ids, positions, slots, starts, context_lens, sample_rows, sample_seqs, rows_per_seq, prompt_rows = (
            rows
        )
        seqs = batch.seqs
        max_blocks = max(len(s.block_table) for s in seqs)
        # One segment of rows per sequence, so the LoRA segments' bounds are the query bounds.
        lora_slots = [s.lora_slot for s in seqs]
        # One host-to-device copy for all integer inputs, then views into it.
        parts = (
            ids,
            positions,
            slots,
            starts,
            context_lens,
            sample_rows,
            padded_tables(seqs, max_blocks),
            lora_slots,
        )
        packed = int64_tensor(itertools.chain.from_iterable(parts)).to(self.device)
        views = list(packed.split([len(part) for part in parts]))
        query_start_loc = views[3].int()
        lora = LoRAMetadata(query_start_loc, views[7].int()) if max(lora_slots) >= 0 else None
        return FlatBatch(
            input_ids=views[0],
            positions=views[1],
            metadata=AttentionMetadata(
                slot_mapping=views[2],
                query_start_loc=query_start_loc,
                context_lens=views[4].int(),
                block_tables=views[6].view(len(seqs), max_blocks).int(),
                max_query_len=1 if decode is not None else max(batch.num_tokens),
                max_context_len=max(context_lens),
                lora=lora,
            ),
            sample_rows=views[5],
            sample_seqs=sample_seqs,
            rows_per_seq=rows_per_seq,
            prompt_rows=prompt_rows,
        )

    def _decode_rows(self, batch: ScheduledBatch) -> _Rows | None:
        """Return the rows of a step where every sequence decodes one token it has caught up to (one row and
        one sample each, no drafts, no prompt rows); None for any other step."""
        if batch.num_tokens.count(1) != len(batch.num_tokens):
            return None
        size = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq in batch.seqs:
            p, tokens = seq.num_computed_tokens, seq.token_ids
            if len(tokens) != p + 1:  # not caught up (a prefill chunk of one token): the general path
                return None
            ids.append(tokens[p])
            positions.append(p)
            slots.append(seq.block_table[p // size] * size + p % size)
        n = len(ids)
        context_lens = [p + 1 for p in positions]
        return ids, positions, slots, range(n + 1), context_lens, range(n), list(batch.seqs), [1] * n, []

    def _rows(self, batch: ScheduledBatch) -> _Rows:
        """Return the rows of any step: prefill chunks, decodes and drafts under verification together."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        rows_per_seq: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            begin, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            flat_start = len(ids)
            ids.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = seq.block_table
            slots.extend(
                table[p // self.block_size] * self.block_size + p % self.block_size for p in range(begin, end)
            )
            starts.append(len(ids))
            context_lens.append(end)
            if end == seq.num_tokens:
                # A sequence with k drafts is scored at its last k + 1 rows (the scheduler schedules them
                # together); any other caught-up sequence at its last row.
                rows = seq.num_drafts + 1
                if n < rows:
                    raise RuntimeError("drafts scheduled apart from their verification: scheduler bug")
                sample_rows.extend(range(len(ids) - rows, len(ids)))
                sample_seqs.append(seq)
                rows_per_seq.append(rows)
            wants = seq.params.prompt_logprobs is not None and seq.index == 0
            if wants and begin < seq.num_prompt_tokens - 1 and not seq.request.prompt_logprobs_sent:
                # Row r predicts token r+1; prompt logprobs cover prompt tokens 1..P-1.
                last = min(end, seq.num_prompt_tokens - 1)
                prompt_rows.append((seq, flat_start, begin, last - begin))
        return (
            ids,
            positions,
            slots,
            starts,
            context_lens,
            sample_rows,
            sample_seqs,
            rows_per_seq,
            prompt_rows,
        )

    @torch.inference_mode()
    def launch_decode(
        self,
        seqs: list[Sequence],
        first: list[int],
        last: list[int],
        steps: int,
        prev: DecodeLaunch | None,
    ) -> DecodeLaunch:
        """Queue `steps` decode steps for `seqs` and return without waiting for the device.

        Sequence i feeds positions first[i], first[i]+1, ... up to last[i] (its final useful position; steps past
        it recompute last[i] and store nothing). Its first input token is its last known token, or, when `prev`
        is still in flight, the token `prev` samples last for it. Every position's block must be allocated.
        """
        started = time.perf_counter()
        n = len(seqs)
        width = max(len(s.block_table) for s in seqs)
        source = [prev.rows[s.seq_id] for s in seqs] if prev is not None else [s.token_ids[-1] for s in seqs]
        adapters = [s.lora_slot for s in seqs]
        host = int64_tensor(itertools.chain(source, first, last, padded_tables(seqs, width), adapters))
        if self.device.type == "cuda":
            host = host.pin_memory()  # a pageable copy would wait for the work already queued
        packed = host.to(self.device, non_blocking=True)
        src, first_t, last_t, tables_flat, adapters_t = packed.split([n, n, n, n * width, n])
        ids = prev.tokens[-1].index_select(0, src) if prev is not None else src
        block_tables = tables_flat.view(n, width).int()
        lora_slots = adapters_t.int() if max(adapters) >= 0 else None
        greedy = not needs_processing([s.params for s in seqs])
        graphs = self.graphs if self.graphs is not None and self.graphs.fits(n) else None
        if greedy and graphs is not None:
            # The whole launch is one graph replay (DecodeGraphs.launch).
            tokens = graphs.launch(steps, ids, first_t, last_t, block_tables, lora_slots)
        else:
            metadata = None if greedy else self.input_batch.metadata(seqs)

            def pick(logits: torch.Tensor) -> torch.Tensor:
                return sample(logits, metadata)

            forward = graphs.run if graphs is not None else self.forward_logits
            tokens = chained_decode_steps(
                ids, first_t, last_t, block_tables, steps, self.block_size, forward, pick, lora_slots
            )
        done = None
        if self.device.type == "cuda":
            out = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            out.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            out = tokens
        valid = [min(steps, b - a + 1) for a, b in zip(first, last, strict=True)]
        rows = {s.seq_id: i for i, s in enumerate(seqs)}
        return DecodeLaunch(seqs, steps, valid, rows, tokens, out, done, started)

    def _greedy_launch_body(
        self,
        ids: torch.Tensor,
        first: torch.Tensor,
        last: torch.Tensor,
        block_tables: torch.Tensor,
        steps: int,
        lora_slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """What a greedy launch graph captures: eager forwards and an argmax per step."""
        return chained_decode_steps(
            ids, first, last, block_tables, steps, self.block_size, self.forward_logits, _argmax, lora_slots
        )

    def forward_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Run the model eagerly on one decode row per sequence; return float32 logits [B, V]."""
        with self.model.context.use(metadata):
            return self.model.compute_logits(self.model(input_ids, positions))

    def release(self, seqs: list[Sequence]) -> None:
        """Forget finished sequences' per-sequence state (their rows of the input batch)."""
        for seq in seqs:
            self.input_batch.release(seq)

    def collect(self, launch: DecodeLaunch) -> list[list[int]]:
        """Wait for a launch and return each sequence's sampled tokens (only the valid ones)."""
        if launch.done is not None:
            launch.done.synchronize()
        columns = launch.host.t().tolist()
        return [col[:v] for col, v in zip(columns, launch.valid, strict=True)]

    @torch.inference_mode()
    def last_logits(self, batch: ScheduledBatch, max_graph_rows: int = 1) -> torch.Tensor:
        """Run the batch (every sequence caught up by it) and return float32 logits at each one's last row
        [S, V], without sampling: a draft model's proposer draws from them itself. One token per sequence
        replays a decode graph; up to `max_graph_rows` tokens (a draft re-feeding what the target accepted) a
        verification graph, whose other rows' logits are dropped; more (a prompt) run eagerly."""
        flat = self.prepare(batch)
        q, num, graphs = flat.metadata.max_query_len, len(flat.sample_seqs), self.graphs
        if graphs is not None and q == 1 and graphs.fits(num):
            return graphs.run(flat.input_ids, flat.positions, flat.metadata)
        if graphs is not None and q <= max_graph_rows and graphs.fits_verify(num, q):
            return graphs.run_verify(flat.input_ids, flat.positions, flat.metadata)[flat.sample_rows]
        with self.model.context.use(flat.metadata):
            hidden = self.model(flat.input_ids, flat.positions)
        return self.model.compute_logits(hidden[flat.sample_rows])

    def capture_verify(self, max_rows: int, max_batch: int | None = None) -> None:
        """Capture now the verification graphs of 2..max_rows rows per sequence for the batch sizes up to
        max_batch (None: all), so that no later step captures one (nothing to do when running eagerly)."""
        if self.graphs is None or max_batch == 0:
            return
        # A batch of max_batch sequences replays the smallest graph size that holds it.
        sizes = self.graphs.sizes
        bound = None if max_batch is None else next((b for b in sizes if b >= max_batch), sizes[-1])
        for rows in range(2, max_rows + 1):
            self.graphs.capture_verify(rows, bound)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        flat = self.prepare(batch)
        seqs = flat.sample_seqs
        q = flat.metadata.max_query_len
        # Every row sampled and no prompt rows: a decode step (q = 1) or a verification of drafts (q > 1).
        all_sampled = not flat.prompt_rows and len(flat.sample_rows) == flat.input_ids.shape[0]
        graphs = self.graphs if all_sampled else None
        hidden: torch.Tensor | None = None
        logits: torch.Tensor | None
        if graphs is not None and q == 1 and graphs.fits(len(seqs)):
            logits = graphs.run(flat.input_ids, flat.positions, flat.metadata)
        elif graphs is not None and graphs.fits_verify(len(seqs), q):
            logits = graphs.run_verify(flat.input_ids, flat.positions, flat.metadata)
        else:
            with self.model.context.use(flat.metadata):
                hidden = self.model(flat.input_ids, flat.positions)  # [T, hidden]
            logits = self.model.compute_logits(hidden[flat.sample_rows]) if seqs else None
        parts: list[torch.Tensor] = []
        k = max((s.params.logprobs or 0 for s in seqs), default=0)
        verify = len(flat.sample_rows) > len(seqs)
        if verify and logits is not None:  # [R, V], k + 1 rows per sequence with k drafts
            parts += self._verify(logits, flat, k)
        elif seqs and logits is not None:  # [S, V]
            processed = needs_processing([s.params for s in seqs])
            next_ids = sample(logits, self.input_batch.metadata(seqs) if processed else None)  # [S]
            parts.append(next_ids.double())
            if any(s.params.logprobs is not None for s in seqs):
                chosen, top_lp, top_ids = top_logprobs(logits, next_ids, k)
                parts += [chosen.double(), top_lp.double().flatten(), top_ids.double().flatten()]
        prompt_parts = self._prompt_logprob_parts(hidden, flat) if hidden is not None else []
        parts += prompt_parts
        # The step's one host sync.
        host = parts[0].tolist() if len(parts) == 1 else torch.cat(parts).tolist() if parts else []
        if verify:
            return self._unpack_verified(host, flat, k, bool(prompt_parts))
        return self._unpack(host, flat, k, bool(prompt_parts))

    def _verify(self, logits: torch.Tensor, flat: FlatBatch, k: int) -> list[torch.Tensor]:
        """Run the rejection sampler over every sampled row; return the parts to read back: each row's
        emitted token if it is reached, whether its draft was accepted, and (when asked) target logprobs."""
        seqs, counts = flat.sample_seqs, flat.rows_per_seq
        meta = self.input_batch.metadata(seqs, counts)
        drafts = [t for seq in seqs for t in [*seq.draft_token_ids, -1]]
        draft_t = torch.tensor(drafts, dtype=torch.int64).to(self.device)
        if meta.all_greedy:  # p is one-hot on the argmax: a draft passes iff it is the argmax
            recovered = apply_penalties_and_bias(logits, meta).argmax(dim=-1)
            accepted = draft_t == recovered
        else:
            p = target_probs(logits, meta)  # [R, V]
            accepted, recovered = rejection_sample(
                p, self._draft_probs(p, seqs, counts, draft_t), draft_t, meta.generators
            )
        chosen = torch.where(accepted, draft_t, recovered)  # each row's token, up to its first rejection
        parts = [chosen.double(), accepted.double()]
        if any(s.params.logprobs is not None for s in seqs):
            chosen_lp, top_lp, top_ids = top_logprobs(logits, chosen, k)
            parts += [chosen_lp.double(), top_lp.double().flatten(), top_ids.double().flatten()]
        return parts

    def _draft_probs(
        self, p: torch.Tensor, seqs: list[Sequence], counts: list[int], drafts: torch.Tensor
    ) -> torch.Tensor:
        """Return q [R, V]: each draft row's draft distribution (one-hot when the proposer gave none), zero
        on rows without a draft."""
        q = torch.zeros_like(p)
        one_hot: list[int] = []
        row = 0
        for seq, r in zip(seqs, counts, strict=True):
            if r > 1 and seq.draft_probs is None:
                one_hot += range(row, row + r - 1)
            elif r > 1 and seq.draft_probs is not None:
                width = min(seq.draft_probs.shape[1], p.shape[1])
                q[row : row + r - 1, :width] = seq.draft_probs[:, :width].to(q.dtype)
            row += r
        if one_hot:
            hot = torch.tensor(one_hot, dtype=torch.int64).to(self.device)
            q[hot, drafts[hot]] = 1.0
        return q

    def _unpack_verified(self, host: list[float], flat: FlatBatch, k: int, has_prompt: bool) -> StepResult:
        seqs, counts = flat.sample_seqs, flat.rows_per_seq
        rows = sum(counts)
        chosen = [int(x) for x in host[:rows]]
        accepted = [x > 0 for x in host[rows : 2 * rows]]
        pos = 2 * rows
        row_lps: list[Logprob | None] = [None] * rows
        if any(s.params.logprobs is not None for s in seqs):
            lp, top_lp = host[pos : pos + rows], host[pos + rows : pos + rows * (1 + k)]
            top_ids = host[pos + rows * (1 + k) : pos + rows * (1 + 2 * k)]
            pos += rows * (1 + 2 * k)
            start = 0
            for seq, r in zip(seqs, counts, strict=True):
                n = seq.params.logprobs
                if n is not None:
                    for i in range(start, start + r):
                        row_lps[i] = (lp[i], [(int(top_ids[i * k + j]), top_lp[i * k + j]) for j in range(n)])
                start += r
        num_accepted = first_rejections(accepted, counts)
        result = StepResult([], [], [], num_accepted=num_accepted)
        start = 0
        for r, n in zip(counts, num_accepted, strict=True):
            result.token_ids.append(chosen[start + n])
            result.logprobs.append(row_lps[start + n])
            result.draft_logprobs.append(row_lps[start : start + n])
            start += r
        result.prompt_logprobs = _unpack_prompt_logprobs(host[pos:], flat) if has_prompt else []
        return result

    def _prompt_logprob_parts(self, hidden: torch.Tensor, flat: FlatBatch) -> list[torch.Tensor]:
        parts: list[torch.Tensor] = []
        for seq, flat_start, first, count in flat.prompt_rows:
            k = seq.params.prompt_logprobs or 0
            logits = self.model.compute_logits(hidden[flat_start : flat_start + count])
            targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + count], device=self.device)
            chosen, top_lp, top_ids = top_logprobs(logits, targets, k)
            parts += [chosen.double(), top_lp.double().flatten(), top_ids.double().flatten()]
        return parts

    def _unpack(self, host: list[float], flat: FlatBatch, k: int, has_prompt: bool) -> StepResult:
        seqs = flat.sample_seqs
        pos = 0

        def take(n: int) -> list[float]:
            nonlocal pos
            pos += n
            return host[pos - n : pos]

        token_ids = [int(x) for x in take(len(seqs))]
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(seqs)
        if any(s.params.logprobs is not None for s in seqs):
            chosen, top_lp, top_ids = take(len(seqs)), take(len(seqs) * k), take(len(seqs) * k)
            for i, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    n = seq.params.logprobs
                    top = [(int(top_ids[i * k + j]), top_lp[i * k + j]) for j in range(n)]
                    logprobs[i] = (chosen[i], top)
        prompt = _unpack_prompt_logprobs(host[pos:], flat) if has_prompt else []
        return StepResult(token_ids=token_ids, logprobs=logprobs, prompt_logprobs=prompt)


def _unpack_prompt_logprobs(host: list[float], flat: FlatBatch) -> list[tuple[Sequence, int, list[Logprob]]]:
    """Return the prompt-logprob rows of a step from the tail of its host read-back."""
    pos = 0

    def take(n: int) -> list[float]:
        nonlocal pos
        pos += n
        return host[pos - n : pos]

    prompt: list[tuple[Sequence, int, list[Logprob]]] = []
    for seq, _start, first, count in flat.prompt_rows:
        k_p = seq.params.prompt_logprobs or 0
        chosen, top_lp, top_ids = take(count), take(count * k_p), take(count * k_p)
        rows = [
            (chosen[r], [(int(top_ids[r * k_p + j]), top_lp[r * k_p + j]) for j in range(k_p)])
            for r in range(count)
        ]
        prompt.append((seq, first, rows))
    return prompt
