"""The web tier's check of a request's JSON schema, before the request is queued: is it small and shallow
enough, and can xgrammar build a grammar from it? xgrammar (and torch, which it imports) load on the first
schema, not with the module: a web process that never sees one starts seconds sooner on a small CPU and holds a
few hundred MB less."""

from __future__ import annotations

import json
import re
from typing import Any

from gpu_worker.errors import InvalidRequestError

# Compact JSON (", " and ": " separators, no free whitespace): a model cannot stall in a run of blanks.
ANY_WHITESPACE = False
# How deeply a schema document may nest (objects and lists): xgrammar's time grows about as depth**3, so a few
# kilobytes nested 1,000 deep held a CPU for minutes, in the web tier's event loop and the engine's loop alike.
# 64 is over six times the 10 levels OpenAI allows (an object level is two: "properties", then the property).
MAX_SCHEMA_DEPTH = 64
# How many JSON values (objects, lists, strings, numbers...) a schema document may hold: breadth costs like
# depth, and optional properties most: on the development CPU the engine compiled 1,000 optional properties
# (2,003 values) in 2.6 s and 400 in 0.2 s, on its one compiling thread, which every new schema queues for;
# 512 values (~250 optional properties) stay under ~0.15 s. Required properties cost far less (500: 70 ms).
MAX_SCHEMA_VALUES = 512
# xgrammar's C++ errors start with "[time] file.cc:line: "; the client gets the reason only.
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


def reason(exc: Exception) -> str:
    """Return xgrammar's error message without its C++ source prefix (what the client is told)."""
    return _CPP_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_json_schema(schema: str, param: str = "json_schema") -> None:
    """Raise InvalidRequestError unless `schema` (JSON text) is a schema a grammar can be built from. Needs no
    tokenizer, so the web tier checks a request with it before the request is queued."""
    import xgrammar as xgr

    check_schema_size(schema, param)
    try:
        xgr.Grammar.from_json_schema(schema, any_whitespace=ANY_WHITESPACE)
    except Exception as exc:  # xgrammar raises RuntimeError or its own InvalidJSONError, with the reason
        raise InvalidRequestError(f"invalid JSON schema: {reason(exc)}", param=param) from None


def check_schema_size(schema: str, param: str = "json_schema") -> None:
    """Raise InvalidRequestError if `schema` (JSON text) nests deeper than MAX_SCHEMA_DEPTH or holds more than
    MAX_SCHEMA_VALUES values."""
    try:
        depth, values = measure(json.loads(schema))
    except ValueError:
        return  # not JSON: xgrammar says why
    except RecursionError:
        depth, values = MAX_SCHEMA_DEPTH + 1, 0  # deeper than Python's own parser goes
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"invalid JSON schema: nested more than {MAX_SCHEMA_DEPTH} levels deep", param=param
        )
    if values > MAX_SCHEMA_VALUES:
        raise InvalidRequestError(
            f"invalid JSON schema: {values} values, more than the {MAX_SCHEMA_VALUES} allowed", param=param
        )


def measure(value: Any) -> tuple[int, int]:
    """Return how deeply objects and lists nest in a JSON value and how many values it holds, itself included
    (no recursion; the walk stops once past either limit)."""
    depth, values, stack = 0, 0, [(value, 0)]
    while stack and depth <= MAX_SCHEMA_DEPTH and values <= MAX_SCHEMA_VALUES:
        node, level = stack.pop()
        values += 1
        if isinstance(node, dict | list):
            depth = max(depth, level + 1)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth, values + len(stack)
