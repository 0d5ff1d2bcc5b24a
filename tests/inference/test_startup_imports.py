"""What a process of the production shape imports to start: torch takes seconds of CPU and hundreds of MB, so
only the worker may load it. A Django process (set-up, ingester; its admin imports the adapter validation,
which loads torch only when it validates) and the web tier with Redis (its tokenizer found without weights,
schemas checked by xgrammar only when one comes) start without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ruvon_cli.stack import ROOT

_PROBE = """
import sys, django
django.setup()
modules = {"django.setup": "torch" in sys.modules}
from django.core.management import call_command
call_command("check")  # every system check, the URL check importing every view
modules["system checks"] = "torch" in sys.modules
import ruvon.asgi
from inference.transport import get_tokenizer
get_tokenizer().encode("hello")
modules["web tier with its tokenizer"] = "torch" in sys.modules
print(modules)
"""


@pytest.mark.parametrize("model", ["random:tiny", "smollm2"])
def test_it_starts_django_and_the_web_tier_without_torch(model: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUVON_", "DATABASE_URL"))} | {
        "DJANGO_SETTINGS_MODULE": "ruvon.settings",
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: nothing here talks to Redis before a request
        "SECRET_KEY": "test-startup-imports",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "RUVON_MODEL": model,
        "RUVON_WARM_START": "0",
    }
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(
        {"django.setup": False, "system checks": False, "web tier with its tokenizer": False}
    )
