"""Error classes the engine raises; each says whose fault it is, so the API can pick a status in one place."""

from __future__ import annotations


class RuvonError(Exception):
    """Base class for every error the engine raises on purpose."""


class InvalidRequestError(RuvonError, ValueError):
    """The request is wrong (bad parameter, prompt too long): fail that request only, HTTP 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code  # OpenAI's error code where it has one (context_length_exceeded)


class InvalidAdapterError(InvalidRequestError):
    """A LoRA adapter cannot be served (unreadable, not a LoRA, wrong shapes for this model, rank too high,
    changed on disk): fail the requests that name it, and only those, HTTP 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, param="model")
        self.reason = reason


class ModelLoadError(RuvonError):
    """A model could not be found, read or understood (missing path, truncated file, unknown architecture)."""


class CapacityError(RuvonError):
    """The engine cannot take more work right now (queue full): retry later, HTTP 503."""
