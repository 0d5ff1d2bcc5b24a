"""CUDA graphs for decode steps: one graph per batch size, replayed by copying inputs into static buffers.

A decode step of GPT-2 124M is ~100 small kernels; launching them eagerly costs more than running them.
Each graph captures forward + logits for a fixed batch size; a batch is padded up to the next captured
size (padded rows store nothing, slot -1, and their outputs are dropped).

Greedy decode launches (model_runner.chained_decode_steps) are captured whole as well: `steps` chained
steps, metadata, argmax and feedback included, so a launch costs the host a few copies and one replay.
Those graphs are captured, in a memory pool of their own, at start-up for the configured step count and on
first use for any other.

Verification steps of speculative decoding (each sequence scored at its k drafts + 1) have graphs keyed by
(rows per sequence q, batch size), in a third pool: the engine captures those of its k + 1 at start-up for the
batch sizes speculation runs at, any other on first use. Every sequence gets q rows
at most; one with fewer (a proposer found fewer drafts) ends its rows early, and the rows past the last
sequence are padding that no attention kernel reads (a sequence of query length 0 is skipped) and whose
outputs are dropped.

With LoRA on, every graph reads each row's adapter slot from a static buffer too (-1: none), so one graph
serves any mix of adapters and base rows.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from gpu_worker.layers.context import AttentionMetadata, LoRAMetadata
from gpu_worker.models.base import CausalLM

# (ids, first, last, block_tables, steps, lora slots or None) -> tokens [steps, B]: a greedy launch's body,
# see model_runner.
LaunchBody = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor
]

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


@contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """Collect now, then keep the collector off while capturing: a dead object collected mid-capture (an old
    engine's pinned buffer or event, say) makes CUDA calls that invalidate the capture."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class _VerifyGraphs:
    """Static inputs for verification graphs of q rows per sequence, and the graphs by batch size."""

    input_ids: torch.Tensor  # [n * q]
    positions: torch.Tensor  # [n * q]
    slot_mapping: torch.Tensor  # [n * q]
    query_start_loc: torch.Tensor  # [n + 1]
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # [bs * q, V] per batch size


class DecodeGraphs:
    def __init__(
        self, model: CausalLM, max_batch: int, max_blocks: int, device: torch.device, lora: bool = False
    ) -> None:
        self.model = model
        self.sizes = [b for b in DEFAULT_BATCH_SIZES if b <= max_batch]
        self.max_blocks = max_blocks
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Each row's adapter slot (one row per sequence: the segments are the rows), when LoRA is on.
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32, device=device) if lora else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Greedy launches: the rows' first and last positions (a padded row has last = -1: it stores nothing).
        self.first = torch.zeros(n, dtype=torch.int64, device=device)
        self.last = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.launch_body: LaunchBody | None = None
        self.launch_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (steps, batch size)
        self.launch_tokens: dict[tuple[int, int], torch.Tensor] = {}
        self.launch_pool = torch.cuda.graph_pool_handle()  # launch graphs' own memory pool
        self.verify: dict[int, _VerifyGraphs] = {}  # by rows per sequence q
        self.verify_pool = torch.cuda.graph_pool_handle()
        self.device = device

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_context_len=self.max_blocks,  # unused by the decode kernel; shapes fix its splits
            lora=self._lora(bs),
        )

    def _lora(self, bs: int) -> LoRAMetadata | None:
        if self.lora_slots is None:
            return None
        return LoRAMetadata(self.query_start_loc[: bs + 1], self.lora_slots[:bs])

    def _copy_lora_slots(self, slots: torch.Tensor | None, num: int, bs: int) -> None:
        """Put the rows' adapter slots (None: no adapter in the batch) in the static buffer, -1 past them."""
        if self.lora_slots is None:
            if slots is not None:
                raise RuntimeError("a batch with LoRA adapters on graphs captured without: engine bug")
            return
        if slots is None:
            self.lora_slots[:bs].fill_(-1)
        else:
            self.lora_slots[:num].copy_(slots, non_blocking=True)
            self.lora_slots[num:bs].fill_(-1)

    def _copy_sequences(self, metadata: AttentionMetadata, num: int, bs: int) -> None:
        """Put the step's per-sequence inputs (context lengths, block tables, adapter slots) of its `num`
        sequences in the static buffers of a graph of batch size `bs`; padded sequences read one key."""
        self.context_lens[:num].copy_(metadata.context_lens, non_blocking=True)
        self.context_lens[num:bs].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:num, :width].copy_(metadata.block_tables, non_blocking=True)
        self._copy_lora_slots(None if metadata.lora is None else metadata.lora.seg_slots, num, bs)

    def _forward(self, bs: int) -> torch.Tensor:
        with self.model.context.use(self._metadata(bs)):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per batch size, largest first so smaller ones reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        with _no_garbage_collection():
            for bs in reversed(self.sizes):
                for _ in range(2):  # warm-up: Triton compiles and autotunes outside capture
                    self._forward(bs)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[bs] = self._forward(bs)
                self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1]

    def run(
        self,
        input_ids: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [B, V]
        """Replay the smallest graph that holds the batch; return logits of the real rows."""
        num = input_ids.shape[0]
        bs = next(b for b in self.sizes if b >= num)
        self.input_ids[:num].copy_(input_ids, non_blocking=True)
        self.positions[:num].copy_(positions, non_blocking=True)
        self.slot_mapping[:num].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[num:bs].fill_(-1)
        self._copy_sequences(metadata, num, bs)
        self.graphs[bs].replay()
        return self.logits[bs][:num]

    def fits_verify(self, num_seqs: int, rows_per_seq: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1] and rows_per_seq > 1

    def _verify_forward(self, v: _VerifyGraphs, q: int, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=v.slot_mapping[: bs * q],
            query_start_loc=v.query_start_loc[: bs + 1],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=q,
            max_context_len=self.max_blocks,  # unused: the kernels read context_lens; shapes fix the grid
            # One adapter segment per sequence: its rows (query_start_loc), its slot.
            lora=None
            if self.lora_slots is None
            else LoRAMetadata(v.query_start_loc[: bs + 1], self.lora_slots[:bs]),
        )
        with self.model.context.use(meta):
            hidden = self.model(v.input_ids[: bs * q], v.positions[: bs * q])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_verify(self, q: int, max_batch: int | None = None) -> None:
        """Capture the verification graphs of q rows per sequence not yet captured, for the batch sizes up to
        `max_batch` (None: all), largest first; run_verify calls it for a size it meets uncaptured."""
        v = self.verify.get(q)
        if v is None:
            n = self.sizes[-1]
            v = self.verify[q] = _VerifyGraphs(
                input_ids=torch.zeros(n * q, dtype=torch.int64, device=self.device),
                positions=torch.zeros(n * q, dtype=torch.int64, device=self.device),
                slot_mapping=torch.full((n * q,), -1, dtype=torch.int64, device=self.device),
                query_start_loc=torch.arange(0, n * q + 1, q, dtype=torch.int32, device=self.device),
            )
        # Warm-ups and captures store nothing: a slot left from an earlier replay would write into a live
        # sequence's cache.
        v.slot_mapping.fill_(-1)
        self.context_lens.fill_(q)
        with _no_garbage_collection():
            for bs in reversed(self.sizes):
                if bs in v.graphs or (max_batch is not None and bs > max_batch):
                    continue
                for _ in range(2):  # warm-up: Triton compiles outside capture
                    self._verify_forward(v, q, bs)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.verify_pool):
                    v.logits[bs] = self._verify_forward(v, q, bs)
                v.graphs[bs] = graph
        torch.cuda.synchronize()

    def run_verify(
        self,
        input_ids: torch.Tensor,  # [T], T <= B * q
        positions: torch.Tensor,  # [T]
        metadata: AttentionMetadata,  # B sequences of at most q rows each
    ) -> torch.Tensor:  # [T, V]
        """Replay the verification graph that holds the batch (captured on first use of this q and batch
        size); return the logits of the real rows."""
        q = metadata.max_query_len
        rows, num = input_ids.shape[0], metadata.block_tables.shape[0]
        bs = next(b for b in self.sizes if b >= num)
        if q not in self.verify or bs not in self.verify[q].graphs:
            self.capture_verify(q, max_batch=bs)
        v = self.verify[q]
        v.input_ids[:rows].copy_(input_ids, non_blocking=True)
        v.positions[:rows].copy_(positions, non_blocking=True)
        v.slot_mapping[:rows].copy_(metadata.slot_mapping, non_blocking=True)
        v.slot_mapping[rows : bs * q].fill_(-1)
        v.query_start_loc[: num + 1].copy_(metadata.query_start_loc, non_blocking=True)
        v.query_start_loc[num + 1 : bs + 1].fill_(rows)  # padded sequences: no rows
        self._copy_sequences(metadata, num, bs)
        v.graphs[bs].replay()
        return v.logits[bs][:rows]

    @torch.inference_mode()
    def capture_launches(self, steps: int) -> None:
        """Capture a greedy launch of `steps` chained steps for every batch size (needs launch_body set)."""
        assert self.launch_body is not None
        body = self.launch_body
        self.last.fill_(-1)  # warm-up runs store nothing
        with _no_garbage_collection():
            for bs in reversed(self.sizes):
                lora = None if self.lora_slots is None else self.lora_slots[:bs]
                args = (
                    self.input_ids[:bs],
                    self.first[:bs],
                    self.last[:bs],
                    self.block_tables[:bs],
                    steps,
                    lora,
                )
                body(*args)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.launch_pool):
                    self.launch_tokens[steps, bs] = body(*args)
                self.launch_graphs[steps, bs] = graph
        torch.cuda.synchronize()

    def launch(
        self,
        steps: int,
        ids: torch.Tensor,  # [B]
        first: torch.Tensor,  # [B] int64
        last: torch.Tensor,  # [B] int64
        block_tables: torch.Tensor,  # [B, W] int32
        lora_slots: torch.Tensor | None = None,  # [B] int32 adapter slot per row; None: no adapters
    ) -> torch.Tensor:  # [steps, B]
        """Replay the greedy launch graph that holds the batch; return its tokens (a view of a static buffer
        that the next launch replay overwrites: read it, or copy it, before queuing that)."""
        if (steps, self.sizes[-1]) not in self.launch_graphs:
            self.capture_launches(steps)
        num = ids.shape[0]
        bs = next(b for b in self.sizes if b >= num)
        self.input_ids[:num].copy_(ids, non_blocking=True)
        self.first[:num].copy_(first, non_blocking=True)
        self.last[:num].copy_(last, non_blocking=True)
        self.last[num:bs].fill_(-1)
        width = block_tables.shape[1]
        self.block_tables[:num, :width].copy_(block_tables, non_blocking=True)
        self._copy_lora_slots(lora_slots, num, bs)
        self.launch_graphs[steps, bs].replay()
        return self.launch_tokens[steps, bs][:, :num]
