"""Production settings from the environment: SECRET_KEY is required in the production shape (a generated one
would differ per host), and `manage.py check --deploy` is clean with the documented TLS settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = {
    "DEBUG": "0",
    "ALLOWED_HOSTS": "api.example.com",
    "SECURE_SSL_REDIRECT": "1",
    "SESSION_COOKIE_SECURE": "1",
    "CSRF_COOKIE_SECURE": "1",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
    "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO",
}


def manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DATABASE_URL", "REDIS_URL"}}
    full = base | {"DJANGO_SETTINGS_MODULE": "ruvon.settings", "RUVON_VAR_DIR": str(tmp_path)} | env
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


def test_it_requires_secret_key_in_the_production_shape(tmp_path: Path) -> None:
    for shape in (
        {"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"},
        {"REDIS_URL": "redis://127.0.0.1:1/0"},
    ):
        result = manage(tmp_path, "check", **shape)
        assert result.returncode != 0 and "SECRET_KEY must be set" in result.stderr, result.stderr[-500:]
    assert not (tmp_path / "secret_key").exists()  # nothing generated behind the operator's back


def test_it_keeps_a_generated_secret_key_in_the_embedded_default(tmp_path: Path) -> None:
    assert manage(tmp_path, "check").returncode == 0
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_it_passes_check_deploy_with_the_documented_settings(tmp_path: Path) -> None:
    key = "k8Vd2#pQ-" + "x7Lm3Zr9Tq" * 6  # long and varied, as Django's check wants
    env = DEPLOY | {"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3", "SECRET_KEY": key}
    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **env)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
