"""The web tier's check of a request's JSON schema, before the request is queued: can xgrammar build a grammar
from it? xgrammar (and torch, which it imports) load on the first schema, not with the module: a web process
that never sees one starts seconds sooner on a small CPU and holds a few hundred MB less."""

from __future__ import annotations

import re

from gpu_worker.errors import InvalidRequestError

# Compact JSON (", " and ": " separators, no free whitespace): a model cannot stall in a run of blanks.
ANY_WHITESPACE = False
# xgrammar's C++ errors start with "[time] file.cc:line: "; the client gets the reason only.
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


def reason(exc: Exception) -> str:
    """Return xgrammar's error message without its C++ source prefix (what the client is told)."""
    return _CPP_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_json_schema(schema: str, param: str = "json_schema") -> None:
    """Raise InvalidRequestError unless `schema` (JSON text) is a schema a grammar can be built from. Needs no
    tokenizer, so the web tier checks a request with it before the request is queued."""
    import xgrammar as xgr

    try:
        xgr.Grammar.from_json_schema(schema, any_whitespace=ANY_WHITESPACE)
    except Exception as exc:  # xgrammar raises RuntimeError or its own InvalidJSONError, with the reason
        raise InvalidRequestError(f"invalid JSON schema: {reason(exc)}", param=param) from None
