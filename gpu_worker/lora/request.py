"""LoRARequest: which adapter a request runs with, as the engine keys it (no torch: the worker imports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """The LoRA adapter a request runs with: a globally unique name ("<tenant id>/<adapter>" from the web
    tier), the directory of its PEFT files, and the sha256 of its weights file, checked before use."""

    name: str
    path: str
    sha256: str

    @property
    def key(self) -> tuple[str, str]:
        """Return what caches are keyed by: a re-upload under the same name never meets stale weights."""
        return (self.name, self.sha256)
