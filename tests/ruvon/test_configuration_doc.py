"""docs/configuration.md lists exactly the environment variables the code reads: each table against its source
files, parsed for os.environ.get / os.environ[...] and the env helpers (env, env_bool, env_int, env_limit, env_list)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"
ENV_HELPERS = {"env", "env_bool", "env_int", "env_limit", "env_list"}
SECTIONS = {
    "Web tier": ["ruvon/settings.py"],
    "Worker and engine": [
        "gpu_worker/engine_args.py",
        "gpu_worker/serving/process.py",
        "gpu_worker/logs.py",
        "gpu_worker/tracing.py",
        "gpu_worker/loading/checkpoints/hub.py",
        "kernels/backend.py",
        "kernels/pdl.py",
    ],
    "Elsewhere": ["inference/health.py", "ruvon/asgi.py"],
}


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def _name(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def variables_read(path: Path) -> set[str]:
    """Return the environment variable names a module reads."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            environ_get = isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value)
            helper = isinstance(func, ast.Name) and func.id in ENV_HELPERS
            if environ_get or helper:
                names.add(_name(node.args[0]))
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            names.add(_name(node.slice))
    return {name for name in names if name}


def documented(section: str) -> set[str]:
    """Return the variables in the first column of the table under the `## <section>` heading."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    table = text[start : end if end != -1 else None]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", table, flags=re.MULTILINE))


@pytest.mark.parametrize("section", SECTIONS)
def test_it_documents_every_environment_variable_and_no_other(section: str) -> None:
    read = set().union(*(variables_read(REPO / path) for path in SECTIONS[section]))
    listed = documented(section)
    assert read - listed == set(), f"read but not in docs/configuration.md ({section})"
    assert listed - read == set(), f"in docs/configuration.md ({section}) but never read"


def test_it_finds_the_variables_the_settings_read() -> None:
    read = variables_read(REPO / "ruvon" / "settings.py")
    assert {"SECRET_KEY", "DEBUG", "REDIS_URL", "SECURE_HSTS_SECONDS", "ALLOWED_HOSTS"} <= read
