"""Schemathesis fuzzes every operation of the served OpenAPI schema (/v1/openapi.json) on a live server
(random:tiny): valid and invalid bodies and queries, over 1,000 cases in all. No answer may be a 5xx, and every
error must be an OpenAI error object {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

if TYPE_CHECKING:
    from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

CASES: Counter[str] = Counter()
MIN_CASES = 1000
# Generation stays fast on a CPU: the fuzzer explores the fields, not long generations.
CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "n": 3}
# CI runs the same 100 cases an operation every time; a deeper search by hand: RUVON_FUZZ_EXAMPLES=2000
# RUVON_FUZZ_RANDOM=1 (new cases each run; a failure prints its curl).
EXAMPLES = int(os.environ.get("RUVON_FUZZ_EXAMPLES") or 100)
RANDOM = os.environ.get("RUVON_FUZZ_RANDOM") == "1"


def load_schema(server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json")


def openai_error_format(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error: {body!r}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"error fields: {sorted(error)}"
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return True


def cap_generation(case: Any) -> None:
    if isinstance(case.body, dict):
        for name, cap in CAPS.items():
            value = case.body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                case.body[name] = cap


MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
OPERATIONS = [
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "GET /v1/usage",
    "POST /v1/tokenize",
    "POST /v1/detokenize",
    "POST /v1/adapters",
    "GET /v1/adapters",
    "GET /v1/adapters/{name}",
    "DELETE /v1/adapters/{name}",
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("label", OPERATIONS)
def test_it_answers_fuzzed_requests_without_5xx_and_in_openai_format(
    tiny_server: LiveServer, label: str, mode: Any
) -> None:
    operation = load_schema(tiny_server).find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served schema"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def fuzz(case: Any) -> None:
        cap_generation(case)
        response = case.call(headers=tiny_server.headers, timeout=60)
        CASES[label] += 1
        case.validate_response(response, checks=[not_a_server_error, openai_error_format])

    fuzz()


def test_it_ran_enough_cases() -> None:
    if len(CASES) < len(OPERATIONS):
        pytest.skip("run with every fuzz test above")
    assert sum(CASES.values()) >= MIN_CASES, CASES
