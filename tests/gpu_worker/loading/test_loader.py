"""The loader: every spec kind, the offline hub cache, dtype conversion, and a clear ModelLoadError for bad input."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.errors import ModelLoadError
from gpu_worker.loading.checkpoints.gguf_file import unpermute_rope_rows
from gpu_worker.loading.loader import load_model, pull
from gpu_worker.runner.kv_cache import forward_dense

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fake_hub(peer_path: Path, cache: Path, repo_id: str = "openai-community/gpt2") -> Path:
    """Lay out a local HF hub cache holding peer_path's files as revision abc123; return the snapshot."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = _copy(peer_path, repo_dir / "snapshots" / "abc123")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    return snapshot


# ---- bad input ----


@pytest.mark.parametrize("spec", ["{tmp}/no-such-dir", "./no-such-file.gguf", "not a model"])
def test_it_reports_a_missing_path(spec: str, tmp_path: Path) -> None:
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match="no model at") as info:
        load_model(spec)
    assert spec in str(info.value)


def test_it_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_model(str(tmp_path / "weights.txt"))


def test_it_tells_how_to_fix_a_hub_cache_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelLoadError, match="openai-community/gpt2-xl is not in the local Hugging Face cache"
    ) as info:
        load_model("gpt2-xl")
    assert "python -m ruvon_cli pull gpt2-xl" in str(info.value)


def test_it_rejects_a_truncated_safetensors(tiny_gpt2, tmp_path: Path) -> None:
    model_dir = _copy(tiny_gpt2.path, tmp_path / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load_model(str(model_dir))


def test_it_rejects_a_checkpoint_missing_a_tensor(tiny_gpt2, tmp_path: Path) -> None:
    model_dir = _copy(tiny_gpt2.path, tmp_path / "model")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks .* 1 tensors.*h\.1\.mlp\.fc\.weight"):
        load_model(str(model_dir))


def test_it_rejects_a_gguf_of_an_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "tiny-mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'mamba' is not supported"):
        load_model(str(path))


def test_it_rejects_a_corrupt_gguf(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random:gpt5", "unknown random shape 'gpt5'; choose one of tiny, gpt2"),
        ("random:tiny?sed=1", "bad option"),
    ],
)
def test_it_rejects_a_bad_random_spec(spec: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "bert", "hidden_size": 64}, "model_type 'bert'; Ruvon runs 'gpt2', 'llama', 'qwen2'"),
        ({"model_type": "llama", "hidden_size": 64}, "lacks or mistypes a required field"),
        (
            {
                "model_type": "llama", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 4, "intermediate_size": 128, "attention_bias": True,
                "rope_scaling": {"rope_type": "yarn", "factor": 8.0},
            },
            "does not implement: attention_bias, rope_type=yarn",
        ),
        (
            {
                "model_type": "llama", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 4, "intermediate_size": 128,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
            },
            "lacks or mistypes a required field: 'low_freq_factor'",
        ),
    ],
)  # fmt: skip
def test_it_rejects_an_unsupported_config(config: dict, message: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(tmp_path))


# ---- sources ----


def test_it_resolves_hub_names_from_the_offline_cache(
    tiny_gpt2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _fake_hub(tiny_gpt2.path, tmp_path / "home" / "hub")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    loaded = load_model("gpt2")
    assert (loaded.name, loaded.source_kind, loaded.source_path, loaded.is_random) == (
        "gpt2",
        "hf_dir",
        snapshot,
        False,
    )
    torch.testing.assert_close(
        forward_dense(loaded.model, PROMPT), tiny_gpt2.logits(PROMPT), atol=1e-5, rtol=0
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    assert load_model("openai-community/gpt2").source_path == snapshot


def test_it_pulls_the_cached_snapshot_when_offline(
    tiny_gpt2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _fake_hub(tiny_gpt2.path, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull("gpt2") == snapshot
    with pytest.raises(ModelLoadError, match="could not pull openai-community/gpt2-medium"):
        pull("gpt2-medium")


def test_it_loads_a_pytorch_model_bin(tiny_gpt2, tmp_path: Path) -> None:
    shutil.copy(tiny_gpt2.path / "config.json", tmp_path / "config.json")
    torch.save(tiny_gpt2.model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path))
    torch.testing.assert_close(
        forward_dense(loaded.model, PROMPT), tiny_gpt2.logits(PROMPT), atol=1e-5, rtol=0
    )


def test_it_refuses_a_pytorch_model_bin_with_compressed_records(tiny_gpt2, tmp_path: Path) -> None:
    # torch.load inflates each record whole: deflated, a few MiB of zeros under a view of the right shape
    # would ask for GiBs. torch.save never compresses, so any compressed record is refused before loading.
    shutil.copy(tiny_gpt2.path / "config.json", tmp_path / "config.json")
    plain = tmp_path / "plain.bin"
    torch.save(tiny_gpt2.model.state_dict(), plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelLoadError, match="holds a compressed record"):
        load_model(str(tmp_path))


def test_it_loads_sharded_safetensors(tiny_llama, tmp_path: Path) -> None:
    tiny_llama.model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load_model(str(tmp_path))
    torch.testing.assert_close(
        forward_dense(loaded.model, PROMPT), tiny_llama.logits(PROMPT), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
def test_it_labels_random_weights_and_seeds_them(shape: str) -> None:
    first, again = load_model(f"random:{shape}"), load_model(f"random:{shape}", seed=0)
    other = load_model(f"random:{shape}?seed=3")
    assert (first.is_random, first.source_kind, first.source_path) == (True, "random", None)
    assert first.label == f"{shape} (RANDOM weights, seed 0)"
    assert "RANDOM weights, seed 3" in other.label
    torch.testing.assert_close(
        forward_dense(first.model, PROMPT), forward_dense(again.model, PROMPT), atol=0, rtol=0
    )
    assert not torch.allclose(forward_dense(first.model, PROMPT), forward_dense(other.model, PROMPT))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_it_converts_weights_to_the_requested_dtype(dtype: torch.dtype, tiny_llama) -> None:
    loaded = load_model(str(tiny_llama.path), dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}  # norms included
    logits = forward_dense(loaded.model, PROMPT)
    assert logits.dtype == torch.float32
    expected = tiny_llama.logits(PROMPT)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_it_undoes_llama_cpp_rope_row_order() -> None:
    heads, head_dim, cols = 3, 8, 5
    hf_order = torch.randn(heads * head_dim, cols)
    # llama.cpp stores HF row (head h, half s, index j) at row h*D + 2*j + s.
    gguf_order = torch.empty_like(hf_order)
    for h in range(heads):
        for s in range(2):
            for j in range(head_dim // 2):
                gguf_order[h * head_dim + 2 * j + s] = hf_order[h * head_dim + s * head_dim // 2 + j]
    assert torch.equal(unpermute_rope_rows(gguf_order, heads), hf_order)
