"""The local Hugging Face hub cache: resolving names offline, and `pull`, the one place that downloads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gpu_worker.errors import ModelLoadError

GPT2_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
PULL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


def is_hub_name(spec: str) -> bool:
    """Return whether `spec` reads as a hub repo id (org/name) or a bare GPT-2 name."""
    return spec in GPT2_HUB_NAMES or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None


def hub_repo_id(name: str) -> str:
    """Return the hub repo id for `name`; bare GPT-2 names live under openai-community/."""
    return f"openai-community/{name}" if name in GPT2_HUB_NAMES else name


def hub_cache_dir() -> Path:
    """Return the local hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return Path(os.environ.get("HF_HOME", cache_home / "huggingface")).expanduser() / "hub"


def resolve_cached_snapshot(name: str, cache_dir: Path | None = None) -> Path:
    """Return the snapshot directory of `name` in the local hub cache, without touching the network."""
    repo_id = hub_repo_id(name)
    repo_dir = (cache_dir or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidates = [repo_dir / "snapshots" / ref.read_text().strip() / "config.json"]
    else:
        candidates = sorted((repo_dir / "snapshots").glob("*/config.json"))
    if len(candidates) == 1 and candidates[0].is_file():
        return candidates[0].parent
    raise ModelLoadError(
        f"{repo_id} is not in the local Hugging Face cache (looked for {repo_dir}/snapshots/<rev>/config.json). "
        f"On a machine with internet run `python -m ruvon_cli pull {name}`, point HF_HUB_CACHE or HF_HOME "
        "at a cache that has it, or pass a local model directory"
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def pull(repo_id: str, cache_dir: str | None = None) -> Path:
    """Download a model's config, safetensors and tokenizer files into the hub cache; return the snapshot dir.

    With HF_HUB_OFFLINE=1, return the cached snapshot without touching the network.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo = hub_repo_id(repo_id)
    try:
        path = snapshot_download(
            repo,
            cache_dir=cache_dir or hub_cache_dir(),
            allow_patterns=PULL_PATTERNS,
            local_files_only=_offline(),
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelLoadError(f"could not pull {repo}: {exc}") from exc
    return Path(str(path))
