"""docs/models.md's supported-models table against the code: every architecture the engine builds, each
capability as the loader, quantisation and LoRA registries have it, and HF's class names."""

from __future__ import annotations

from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gpu_worker.loading.families import FamilySupport, supported_families

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
COLUMNS = ["architecture", "HF class", "HF dir", "GGUF", "hub pull", "quantisation", "LoRA", "speculative"]


def _table_rows() -> list[dict[str, str]]:
    """Return the rows of the first table whose header is COLUMNS, as {column: cell}."""
    lines = [line.strip() for line in DOC.read_text(encoding="utf-8").splitlines()]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    start = cells.index(COLUMNS) + 2  # past the header and its --- row
    rows = []
    for row in cells[start:]:
        if len(row) != len(COLUMNS):
            break
        rows.append(dict(zip(COLUMNS, row, strict=True)))
    return rows


def _expected_row(family: FamilySupport) -> dict[str, str]:
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    return {
        "architecture": family.arch,
        "HF class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family.arch],
        "HF dir": yes(family.hf_dir),
        "GGUF": yes(family.gguf),
        "hub pull": yes(family.hf_dir),  # pull fetches an HF directory
        "quantisation": yes(family.quantization),
        "LoRA": yes(family.lora),
        "speculative": yes(family.speculative),
    }


def test_it_lists_every_family_with_what_the_code_supports() -> None:
    rows = {row["architecture"]: row for row in _table_rows()}
    families = supported_families()
    assert sorted(rows) == sorted(f.arch for f in families)
    for family in families:
        assert rows[family.arch] == _expected_row(family)


def test_it_links_the_table_from_the_readme() -> None:
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "(docs/models.md)" in readme
