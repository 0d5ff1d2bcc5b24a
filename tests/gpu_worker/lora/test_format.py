"""Reading and checking PEFT adapters: what a good one reports, and a clear reason for every bad one."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.errors import InvalidAdapterError, InvalidRequestError
from gpu_worker.loading.loader import load_model
from gpu_worker.lora.format import adapter_targets, check_adapter, read_adapter, read_adapter_config
from tests.gpu_worker.conftest import Peer
from tests.gpu_worker.lora.conftest import make_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def gpt2_targets(tiny_gpt2: Peer) -> dict[str, tuple[int, int]]:
    return adapter_targets(load_model(str(tiny_gpt2.path)).model)


@pytest.fixture
def gpt2_adapter(tiny_gpt2: Peer, tmp_path: Path) -> Path:
    make_adapter(tiny_gpt2.model, tmp_path / "ad", rank=4, alpha=8)
    return tmp_path / "ad"


def _edit_config(path: Path, **changes: object) -> None:
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _refused(path: Path, targets: dict[str, tuple[int, int]], *, layers: int = 2, max_rank: int = 16) -> str:
    with pytest.raises(InvalidAdapterError) as info:
        check_adapter(path, targets, layers, max_rank)
    assert isinstance(info.value, InvalidRequestError)  # fails the request, never the worker
    return info.value.reason


def test_it_reports_targets_of_both_architectures(tiny_gpt2: Peer, tiny_llama: Peer) -> None:
    gpt2 = adapter_targets(load_model(str(tiny_gpt2.path)).model)
    assert gpt2 == {"c_attn": (64, 192), "attn.c_proj": (64, 64), "c_fc": (64, 256), "mlp.c_proj": (256, 64)}
    llama = adapter_targets(load_model(str(tiny_llama.path)).model)
    hf = tiny_llama.model.model.layers[0]
    for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        module = getattr(hf.self_attn, name)
        assert llama[name] == (module.in_features, module.out_features)
    for name in ["gate_proj", "up_proj", "down_proj"]:
        module = getattr(hf.mlp, name)
        assert llama[name] == (module.in_features, module.out_features)


def test_it_checks_a_peft_adapter(gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]) -> None:
    info = check_adapter(gpt2_adapter, gpt2_targets, 2, 16)
    data = (gpt2_adapter / WEIGHTS).read_bytes()
    assert info.rank == 4 and info.alpha == 8.0
    assert info.target_modules == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    assert info.size_bytes == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    # The web tier checks against the heartbeat's JSON copy of the targets: lists, not tuples.
    heartbeat = json.loads(json.dumps(gpt2_targets))
    assert check_adapter(gpt2_adapter, heartbeat, 2, 16) == info


def test_it_reads_weights_as_peft_stores_them(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    adapter = read_adapter(gpt2_adapter, gpt2_targets, 2, 16)
    stored = load_file(gpt2_adapter / WEIGHTS)
    a, b = adapter.weights[(1, "mlp.c_proj")]
    assert torch.equal(a, stored["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"])
    assert torch.equal(b, stored["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"])
    assert len(adapter.weights) == 2 * 4  # layers x targets


def test_it_scales_by_alpha_over_r_or_its_root(gpt2_adapter: Path) -> None:
    assert read_adapter_config(gpt2_adapter).scaling == 8 / 4
    _edit_config(gpt2_adapter, use_rslora=True, r=9, lora_alpha=6)
    assert read_adapter_config(gpt2_adapter).scaling == pytest.approx(6 / math.sqrt(9))


def test_it_accepts_an_adapter_name_infix_and_a_weights_only_bin(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    stored = load_file(gpt2_adapter / WEIGHTS)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in stored.items()}
    (gpt2_adapter / WEIGHTS).unlink()
    torch.save(renamed, gpt2_adapter / "adapter_model.bin")
    adapter = read_adapter(gpt2_adapter, gpt2_targets, 2, 16)
    assert torch.equal(
        adapter.weights[(0, "c_attn")][0],
        stored["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"],
    )


def test_it_refuses_a_missing_or_broken_config(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    (gpt2_adapter / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in _refused(gpt2_adapter, gpt2_targets)
    (gpt2_adapter / "adapter_config.json").unlink()
    assert "no adapter_config.json" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_what_is_not_a_lora(gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]) -> None:
    _edit_config(gpt2_adapter, peft_type="IA3")
    assert "not a LoRA adapter" in _refused(gpt2_adapter, gpt2_targets)
    _edit_config(gpt2_adapter, peft_type="LORA", use_dora=True)
    assert "DoRA" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_a_rank_above_the_maximum(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    assert "rank 4 is above this server's maximum LoRA rank 2" in _refused(
        gpt2_adapter, gpt2_targets, max_rank=2
    )


def test_it_refuses_a_target_module_the_model_lacks(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]], tiny_llama: Peer, tmp_path: Path
) -> None:
    _edit_config(gpt2_adapter, target_modules=["c_attn", "q_proj"])
    assert "target module 'q_proj' is not a projection of this model" in _refused(gpt2_adapter, gpt2_targets)
    # A Llama adapter on GPT-2: every name is foreign.
    make_adapter(tiny_llama.model, tmp_path / "llama")
    assert "is not a projection of this model" in _refused(tmp_path / "llama", gpt2_targets)


def test_it_refuses_tensors_that_do_not_fit(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    wider = {**gpt2_targets, "c_attn": (72, 192)}
    assert "c_attn.lora_A.weight' has shape (4, 64), this model needs (4, 72)" in _refused(
        gpt2_adapter, wider
    )
    taller = {**gpt2_targets, "c_fc": (64, 128)}
    assert "c_fc.lora_B.weight' has shape (256, 4), this model needs (128, 4)" in _refused(
        gpt2_adapter, taller
    )


def test_it_refuses_a_layer_past_the_last(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    assert "is for layer 1; this model has 1 layers" in _refused(gpt2_adapter, gpt2_targets, layers=1)


def test_it_refuses_a_pickle_bin(gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]) -> None:
    stored = load_file(gpt2_adapter / WEIGHTS)
    (gpt2_adapter / WEIGHTS).unlink()
    # An object torch's weights-only unpickler will not build (any class outside its allow-list).
    torch.save({"payload": shutil.copyfile, **stored}, gpt2_adapter / "adapter_model.bin")
    assert "refused by the weights-only loader" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_missing_or_corrupt_weights(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    (gpt2_adapter / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    assert "not a valid safetensors file" in _refused(gpt2_adapter, gpt2_targets)
    (gpt2_adapter / WEIGHTS).unlink()
    assert "no weights file" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_a_lone_half_or_a_stray_tensor(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    stored = load_file(gpt2_adapter / WEIGHTS)
    lone = {k: v for k, v in stored.items() if "h.0.attn.c_attn.lora_B" not in k}
    save_file(lone, gpt2_adapter / WEIGHTS)
    assert "layer 0 c_attn has lora_A without its partner" in _refused(gpt2_adapter, gpt2_targets)
    save_file(
        {**stored, "base_model.model.transformer.wte.lora_embedding_A": torch.zeros(4, 8)},
        gpt2_adapter / WEIGHTS,
    )
    assert "is not a LoRA A or B weight" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_weights_changed_since_the_registry_checked_them(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    sha = check_adapter(gpt2_adapter, gpt2_targets, 2, 16).sha256
    read_adapter(gpt2_adapter, gpt2_targets, 2, 16, expected_sha256=sha)  # the same bytes pass
    stored = load_file(gpt2_adapter / WEIGHTS)
    save_file({k: v + 1 for k, v in stored.items()}, gpt2_adapter / WEIGHTS)
    with pytest.raises(InvalidAdapterError, match="changed on disk"):
        read_adapter(gpt2_adapter, gpt2_targets, 2, 16, expected_sha256=sha)


def test_it_refuses_a_bin_whose_records_inflate_past_its_size(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    # Every tensor has the right shape, but one is a view of a 16 MiB storage that torch.load would inflate
    # from a few KiB of deflated zeros: at the upload limit that is a thousand times the limit in memory.
    stored = load_file(gpt2_adapter / WEIGHTS)
    (gpt2_adapter / WEIGHTS).unlink()
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    big = torch.zeros(4 << 20)
    stored[key] = big[: stored[key].numel()].view(stored[key].shape)
    plain = io.BytesIO()
    torch.save(stored, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(gpt2_adapter / "adapter_model.bin", "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert (gpt2_adapter / "adapter_model.bin").stat().st_size < big.nbytes // 100
    assert "holds compressed records" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_crafted_files_with_a_reason(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    # Each of these raised a bare RecursionError, ValueError or KeyError: "an internal error" to the uploader.
    config = gpt2_adapter / "adapter_config.json"
    good = config.read_text()
    config.write_text("[" * 100_000 + "]" * 100_000)
    assert "not valid JSON" in _refused(gpt2_adapter, gpt2_targets)
    config.write_text(good.replace('"r": 4', '"r": ' + "9" * 5000))
    assert "not valid JSON" in _refused(gpt2_adapter, gpt2_targets)
    config.write_text(good)
    stored = load_file(gpt2_adapter / WEIGHTS)
    a = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    for layer, reason in (
        ("\N{SUPERSCRIPT TWO}", "not inside a decoder layer"),
        ("9" * 5000, "is for layer 999"),
    ):
        save_file({**stored, a.replace(".0.", f".{layer}."): stored[a].clone()}, gpt2_adapter / WEIGHTS)
        assert reason in _refused(gpt2_adapter, gpt2_targets)
    header = json.dumps({a: {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}}).encode()
    (gpt2_adapter / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    assert "dtype 'F8_E8M0', which torch cannot load" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_a_bin_with_a_directory_no_lora_needs(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    (gpt2_adapter / WEIGHTS).unlink()
    with zipfile.ZipFile(gpt2_adapter / "adapter_model.bin", "w") as out:
        for i in range(16_385):
            out.writestr(f"archive/data/{i}", b"")
    assert "holds more records than a LoRA has" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_a_safetensors_header_no_lora_needs(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    # 200,000 empty tensors: an 11 MB header (a few hundred KiB zipped) that safetensors would turn into
    # 200,000 tensors before the first name is refused; at its 100 MB header limit, GiBs and tens of seconds.
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(200_000))
    header = ("{" + entries + "}").encode()
    (gpt2_adapter / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header)
    assert f"has a {len(header)}-byte header" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_a_bin_whose_pickle_no_lora_needs(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    # The pickle is what costs: 150,000 views of one storage make a 10 MiB one (~2 MiB zipped) that the
    # weights-only unpickler spent ~15 s on before the first name was refused; a 256 MiB upload, a quarter of
    # an hour. A 9 MB name makes one as big, quicker to save. A legacy (non-zip) .bin is all pickle: refused.
    (gpt2_adapter / WEIGHTS).unlink()
    one = torch.zeros(1)
    torch.save({"k" * 9_000_000: one}, gpt2_adapter / "adapter_model.bin")
    assert "-byte pickle; a LoRA's needs at most" in _refused(gpt2_adapter, gpt2_targets)
    torch.save({"k": one}, gpt2_adapter / "adapter_model.bin", _use_new_zipfile_serialization=False)
    assert "is not a torch zip file" in _refused(gpt2_adapter, gpt2_targets)


def test_it_refuses_a_config_no_peft_adapter_needs(
    gpt2_adapter: Path, gpt2_targets: dict[str, tuple[int, int]]
) -> None:
    # 3 bytes of JSON a list: ~25x that in memory once parsed, from a zip entry that compresses ~1000x.
    (gpt2_adapter / "adapter_config.json").write_text("[" + "[]," * 400_000 + "[]]")
    reason = _refused(gpt2_adapter, gpt2_targets)
    assert reason.startswith("adapter_config.json is over 1048576 bytes"), reason
