"""AdapterManager: which adapters sit in the model's device slots, an LRU of packed adapters in host memory
behind them, and the reads from disk (checked and hashed) on a thread of their own, so the engine loop
never waits for a file. Slots change only between steps, when the scheduler admits a sequence; a slot is
pinned while a running sequence uses it, so a running request's adapter never moves.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_worker.errors import InvalidAdapterError
from gpu_worker.lora.format import Adapter, adapter_targets, read_adapter
from gpu_worker.lora.layer import LoRALinear, enable_lora
from gpu_worker.lora.request import LoRARequest
from gpu_worker.models.base import CausalLM

log = logging.getLogger("ruvon.lora")

AdapterKey = tuple[str, str]  # (name, sha256): LoRARequest.key
Packed = tuple[torch.Tensor, torch.Tensor, int]  # one LoRALinear's (a [R, in], b [out, R], rank used)


@dataclass
class PackedAdapter:
    """An adapter in the slot table's layout, in host memory (pinned on CUDA), ready to copy into any slot:
    one row of the table, and each projection's rank used and scale (0 where the adapter leaves it alone)."""

    key: AdapterKey
    row: torch.Tensor  # [slot width]: every projection's a then b, in SlotTable order
    ranks: torch.Tensor  # [projections] int32
    scales: torch.Tensor  # [projections] float32
    read_seconds: float  # read, check, hash and pack, on the reader thread


class SlotTable:
    """Every LoRALinear's slots in one table: slot s of every projection's a and b is row s of `rows`, and
    their ranks and scales are column s of `ranks` and `scales` (a row per projection, contiguous over the
    slots as the kernels read them). Putting an adapter in a slot is then three copies, whatever the
    model's depth, where copying projection by projection took four small ones each (768 on GPT-2 XL)."""

    def __init__(self, modules: list[LoRALinear]) -> None:
        first = modules[0].a
        self.spans: list[tuple[int, int, int]] = []  # per module: (a's offset, b's offset, end) in a row
        width = 0
        for module in modules:
            a_size, b_size = module.a[0].numel(), module.b[0].numel()
            self.spans.append((width, width + a_size, width + a_size + b_size))
            width += a_size + b_size
        slots = first.shape[0]
        self.rows = torch.zeros(slots, width, dtype=first.dtype, device=first.device)
        self.ranks = torch.zeros(len(modules), slots, dtype=torch.int32, device=first.device)
        self.scales = torch.zeros(len(modules), slots, dtype=torch.float32, device=first.device)
        for m, (module, (a_at, b_at, end)) in enumerate(zip(modules, self.spans, strict=True)):
            a = self.rows[:, a_at:b_at].view(module.a.shape)
            b = self.rows[:, b_at:end].view(module.b.shape)
            module.share_slots(a, b, self.ranks[m], self.scales[m])

    def pack(
        self, layers: list[Packed | None], scaling: float, pin: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (row, ranks, scales) for one adapter given each module's (a, b, rank used) or None."""
        row = torch.zeros(self.rows.shape[1], dtype=self.rows.dtype)
        ranks = torch.zeros(len(self.spans), dtype=torch.int32)
        scales = torch.zeros(len(self.spans), dtype=torch.float32)
        for m, (entry, (a_at, b_at, end)) in enumerate(zip(layers, self.spans, strict=True)):
            if entry is None:
                continue
            a, b, rank = entry
            row[a_at:b_at] = a.reshape(-1)
            row[b_at:end] = b.reshape(-1)
            ranks[m], scales[m] = rank, scaling
        if pin:
            return row.pin_memory(), ranks.pin_memory(), scales.pin_memory()
        return row, ranks, scales

    def place(self, slot: int, packed: PackedAdapter) -> None:
        """Copy a packed adapter into `slot` of every projection (from pinned memory it does not wait)."""
        self.rows[slot].copy_(packed.row, non_blocking=True)
        self.ranks[:, slot].copy_(packed.ranks, non_blocking=True)
        self.scales[:, slot].copy_(packed.scales, non_blocking=True)


class AdapterManager:
    """Device slots (max_loras) with LRU over a host cache (max_cpu_loras) over the files."""

    def __init__(self, model: CausalLM, max_loras: int, max_rank: int, max_cpu_loras: int) -> None:
        self.targets = adapter_targets(model)
        self.num_layers = model.config.num_layers
        self.max_loras, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max(1, max_cpu_loras)
        places = enable_lora(model, max_loras, max_rank)
        self.modules: list[LoRALinear] = list(dict.fromkeys(module for module, _ in places.values()))
        index = {id(module): i for i, module in enumerate(self.modules)}
        self.places = {place: (index[id(module)], shard) for place, (module, shard) in places.items()}
        self.dtype = self.modules[0].a.dtype
        self.table = SlotTable(self.modules)  # before any CUDA graph captures the slots' addresses
        self.pin_memory = self.modules[0].a.device.type == "cuda"
        self.slots: list[AdapterKey | None] = [None] * max_loras
        self.slot_of: dict[AdapterKey, int] = {}
        self.pins = [0] * max_loras
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))  # unpinned, LRU first
        self.host: OrderedDict[AdapterKey, PackedAdapter] = OrderedDict()  # LRU first
        self.loading: dict[AdapterKey, Future[PackedAdapter]] = {}
        self.failures: dict[AdapterKey, str] = {}  # not yet taken by the engine
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ruvon-lora-reader")
        self.num_reads = self.num_slot_loads = self.num_slot_evictions = 0
        self.last_read_seconds = self.last_slot_seconds = 0.0
        self.num_warm_up_launches, self.warm_up_seconds = 0, 0.0

    def info(self) -> dict[str, Any]:
        """Return what the web tier checks uploads against (the heartbeat's "lora")."""
        targets = {name: list(shape) for name, shape in self.targets.items()}
        return {
            "max_rank": self.max_rank,
            "max_loras": self.max_loras,
            "num_layers": self.num_layers,
            "targets": targets,
        }

    def warm_up(self, max_rows: int, max_segments: int) -> int:
        """Run the LoRA kernels in every launch variant a step of up to `max_rows` rows in `max_segments`
        segments can take, once per distinct kind of layer, so that no step (an adapter's first prefill
        beside running decodes, say) waits for Triton to compile; return how many launches ran."""
        started = time.perf_counter()
        layers = {module.variant(): module for module in self.modules}
        self.num_warm_up_launches = sum(module.warm_up(max_rows, max_segments) for module in layers.values())
        self.warm_up_seconds = time.perf_counter() - started
        return self.num_warm_up_launches

    def stats(self) -> dict[str, float]:
        """Return the slot and cache counters (engine.stats())."""
        return {
            "lora_slots_used": sum(key is not None for key in self.slots),
            "lora_slots_pinned": sum(pins > 0 for pins in self.pins),
            "lora_host_adapters": len(self.host),
            "lora_reads": self.num_reads,
            "lora_slot_loads": self.num_slot_loads,
            "lora_slot_evictions": self.num_slot_evictions,
            "lora_last_read_seconds": self.last_read_seconds,
            "lora_last_slot_seconds": self.last_slot_seconds,
            "lora_warm_up_launches": self.num_warm_up_launches,
            "lora_warm_up_seconds": self.warm_up_seconds,
        }

    # ---- queries -------------------------------------------------------------------------------
    def ready(self, lora: LoRARequest) -> bool:
        """Return whether acquire(lora) can run now; if the adapter is nowhere yet, start reading it."""
        key = lora.key
        if key in self.slot_of:
            return True
        future = self.loading.get(key)
        if future is not None and not future.done():
            return False
        self._collect()
        if key in self.host:
            return bool(self.idle)
        self.prefetch(lora)
        return False

    def prefetch(self, lora: LoRARequest) -> None:
        """Start reading the adapter on the reader thread unless it is in a slot, in host memory, on its way,
        or failed (until that failure is taken)."""
        key = lora.key
        if key in self.slot_of or key in self.host or key in self.loading or key in self.failures:
            return
        self.loading[key] = self._reader.submit(self._read, lora)

    def forget(self, name: str, sha256: str | None = None) -> int:
        """Drop the copies of adapter `name` (only the one with `sha256` when given) from host memory and from
        every slot no running sequence pins; return how many copies went. A pinned slot keeps its adapter
        until its sequences end (they finish on the weights they started with), then leaves by LRU."""

        def named(key: AdapterKey | None) -> bool:
            return key is not None and key[0] == name and (sha256 is None or key[1] == sha256)

        dropped = 0
        for host_key in [k for k in self.host if named(k)]:
            del self.host[host_key]
            dropped += 1
        for slot in [s for s in self.idle if named(self.slots[s])]:
            slot_key = self.slots[slot]
            assert slot_key is not None
            del self.slot_of[slot_key]
            self.slots[slot] = None
            self.idle.move_to_end(slot, last=False)  # a free slot is taken first
            dropped += 1
        return dropped

    def wait_for_reads(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a read in progress to end (an idle engine loop would only spin)."""
        if self.loading:
            wait(list(self.loading.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def take_failures(self) -> dict[AdapterKey, str]:
        """Return the adapters whose read failed since the last call, with the reason; each is forgotten, so
        a later request tries the files again."""
        self._collect()
        failures, self.failures = self.failures, {}
        return failures

    # ---- slots ---------------------------------------------------------------------------------
    def acquire(self, lora: LoRARequest) -> int:
        """Return the adapter's slot, pinned once more; copy it into a slot first (a free one, else the
        least recently used unpinned one) if it is only in host memory. Call only after ready()."""
        slot = self.slot_of.get(lora.key)
        if slot is None:
            if lora.key not in self.host or not self.idle:
                raise RuntimeError("acquire() without ready(): scheduler bug")
            slot = self._place(self.host[lora.key])
        if self.pins[slot] == 0:
            del self.idle[slot]
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot once for a sequence that stopped running; an unpinned slot may be reused."""
        if self.pins[slot] <= 0:
            raise RuntimeError(f"release() of unpinned LoRA slot {slot}: scheduler bug")
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self.idle[slot] = None  # most recently used

    def load_now(self, name: str, path: str | Path) -> LoRARequest:
        """Read an adapter (no sha256 to check against: its own is taken) and put it in a slot now; for the
        adapters named at start-up. Raise InvalidAdapterError if it is unusable or every slot is pinned."""
        adapter = read_adapter(path, self.targets, self.num_layers, self.max_rank)
        lora = LoRARequest(name, str(path), adapter.info.sha256)
        if lora.key not in self.slot_of:
            if not self.idle:
                raise InvalidAdapterError(f"no free LoRA slot for {name!r} (all {self.max_loras} in use)")
            self._remember(self._pack(lora.key, adapter, 0.0))
            self.idle.move_to_end(self._place(self.host[lora.key]))
        return lora

    def close(self) -> None:
        """Stop the reader thread (reads in progress finish; their results are dropped)."""
        self._reader.shutdown(wait=False, cancel_futures=True)

    # ---- internals -----------------------------------------------------------------------------
    def _place(self, packed: PackedAdapter) -> int:
        """Copy a packed adapter into a free slot, else into the least recently used unpinned one."""
        started = time.perf_counter()
        slot = next((s for s in self.idle if self.slots[s] is None), next(iter(self.idle)))
        old = self.slots[slot]
        if old is not None:
            del self.slot_of[old]
            self.num_slot_evictions += 1
        self.table.place(slot, packed)
        self.slots[slot] = packed.key
        self.slot_of[packed.key] = slot
        self.host.move_to_end(packed.key)
        self.num_slot_loads += 1
        self.last_slot_seconds = time.perf_counter() - started
        return slot

    def _collect(self) -> None:
        """Move finished reads into the host cache, or their errors into failures."""
        for key, future in list(self.loading.items()):
            if not future.done():
                continue
            del self.loading[key]
            error = future.exception()
            if error is None:
                packed = future.result()
                self.last_read_seconds = packed.read_seconds
                self._remember(packed)
            else:
                reason = (
                    error.reason
                    if isinstance(error, InvalidAdapterError)
                    else f"{type(error).__name__}: {error}"
                )
                log.warning("LoRA adapter %s cannot be loaded: %s", key[0], reason)
                self.failures[key] = reason

    def _remember(self, packed: PackedAdapter) -> None:
        self.host[packed.key] = packed
        self.host.move_to_end(packed.key)
        self.num_reads += 1
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)  # one in a slot stays there; it is read again once evicted

    def _read(self, lora: LoRARequest) -> PackedAdapter:
        """Read, check and pack an adapter (on the reader thread: no slot or engine state is touched)."""
        started = time.perf_counter()
        adapter = read_adapter(lora.path, self.targets, self.num_layers, self.max_rank, lora.sha256)
        return self._pack(lora.key, adapter, started)

    def _pack(self, key: AdapterKey, adapter: Adapter, started: float) -> PackedAdapter:
        pieces: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in self.modules]
        for place, pair in adapter.weights.items():
            index, shard = self.places[place]
            pieces[index][shard] = pair
        layers: list[Packed | None] = [
            layer.pack(parts, self.dtype) if parts else None
            for layer, parts in zip(self.modules, pieces, strict=True)
        ]
        row, ranks, scales = self.table.pack(layers, adapter.config.scaling, self.pin_memory)
        seconds = time.perf_counter() - started if started else 0.0
        return PackedAdapter(key, row, ranks, scales, seconds)
