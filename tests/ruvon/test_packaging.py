"""A plain `pip install .` carries what the web tier serves: the templates and static files ship inside the
ruvon package, and the kernels' tuned launch shapes inside kernels."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_it_ships_the_pages_and_their_assets_in_the_wheel(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ruvon-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {path.relative_to(ROOT).as_posix() for path in (ROOT / "ruvon").rglob("*") if path.is_file()}
    pages = {name for name in shipped if name.startswith(("ruvon/templates/", "ruvon/static/"))}
    assert "ruvon/templates/inference/chat.html" in pages and "ruvon/static/inference/chat.js" in pages
    assert pages <= names, sorted(pages - names)
    assert "kernels/tuned_configs.json" in names
