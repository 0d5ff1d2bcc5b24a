"""The AdapterManager's one slot table: every projection's slots are views of it, an adapter goes into a
slot in three copies however deep the model, and a slot taken over by an adapter that leaves some
projections alone leaves nothing of the previous adapter there."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch.profiler import profile

from gpu_worker.loading.loader import load_model, random_hf_config
from gpu_worker.lora.format import Adapter, read_adapter
from gpu_worker.lora.manager import AdapterManager
from gpu_worker.runner.kv_cache import forward_dense
from tests.gpu_worker.lora.conftest import make_adapter

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]


def _base(root: Path) -> transformers.PreTrainedModel:
    config = random_hf_config("tiny")
    config.initializer_range = 0.3
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(root / "base")
    return model


@torch.inference_mode()
def test_a_slot_taken_over_keeps_nothing_of_the_adapter_before(tmp_path: Path) -> None:
    base = _base(tmp_path)
    make_adapter(base, tmp_path / "everywhere", rank=8, seed=1)
    make_adapter(base, tmp_path / "fc-only", rank=4, targets=["c_fc"], seed=2)

    fresh_model = load_model(str(tmp_path / "base")).model
    fresh = AdapterManager(fresh_model, max_loras=1, max_rank=8, max_cpu_loras=1)
    alone = fresh.load_now("fc-only", tmp_path / "fc-only")
    expected = forward_dense(fresh_model, PROMPT, lora_slot=fresh.slot_of[alone.key])

    model = load_model(str(tmp_path / "base")).model
    manager = AdapterManager(model, max_loras=1, max_rank=8, max_cpu_loras=1)
    everywhere = manager.load_now("everywhere", tmp_path / "everywhere")
    before = forward_dense(model, PROMPT, lora_slot=manager.slot_of[everywhere.key])
    assert (before - expected).abs().max() > 0.1  # the two adapters differ visibly
    fc_only = manager.load_now("fc-only", tmp_path / "fc-only")  # one slot: evicts the first
    assert manager.num_slot_evictions == 1
    torch.testing.assert_close(forward_dense(model, PROMPT, lora_slot=manager.slot_of[fc_only.key]), expected)


def test_every_projection_reads_its_slots_from_the_table_and_placing_is_three_copies(tmp_path: Path) -> None:
    base = _base(tmp_path)
    make_adapter(base, tmp_path / "adapter", rank=8)
    model = load_model(str(tmp_path / "base")).model
    manager = AdapterManager(model, max_loras=2, max_rank=8, max_cpu_loras=2)
    table = manager.table
    rows = table.rows.untyped_storage().data_ptr()
    for module in manager.modules:
        assert module.a.untyped_storage().data_ptr() == rows
        assert module.b.untyped_storage().data_ptr() == rows
        assert module.ranks.untyped_storage().data_ptr() == table.ranks.untyped_storage().data_ptr()
        assert module.scales.untyped_storage().data_ptr() == table.scales.untyped_storage().data_ptr()
    packed = manager._pack(("adapter", "sha"), _read(manager, tmp_path / "adapter"), 0.0)
    with profile() as prof:
        manager.table.place(1, packed)
    copies = [e for e in prof.events() if e.name == "aten::copy_"]
    assert len(copies) == 3, [e.name for e in prof.events()]
    assert len(manager.modules) > 3  # so per-projection copying would have shown as more
    assert all(int(module.ranks[1]) > 0 for module in manager.modules)


def _read(manager: AdapterManager, path: Path) -> Adapter:
    return read_adapter(path, manager.targets, manager.num_layers, manager.max_rank)
