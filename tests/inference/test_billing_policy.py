"""The billing policy per terminal state (docs/platform.md): completed and cancelled requests are billed their
tokens, failed and rejected ones nothing, and device time is cost whatever the ending; a request whose client
was told an error is unbilled whichever of the web tier and the worker records it first; the worker never
starts a job withdrawn while it waited, and keeps the device time of one that timed out."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.serving.memory_transport import MemoryTransport
from gpu_worker.serving.protocol import make_job
from gpu_worker.serving.worker import Worker
from inference.models import UsageRecord
from inference.usage import record_told_error, record_usage
from tests.conftest import Person

TIMINGS = {"device_s": 2.0, "queued_s": 0.1}


@pytest.mark.parametrize(
    "status, billed",
    [("completed", True), ("cancelled", True), ("failed", False), ("rejected", False)],
)
def test_it_bills_tokens_only_for_completed_and_cancelled_requests(
    owner: Person, make_usage_event: Any, status: str, billed: bool
) -> None:
    assert record_usage(make_usage_event(owner, status=status, timings=TIMINGS))
    record = UsageRecord.objects.get(request_id="req_1")
    assert (record.revenue_usd > 0) is billed
    assert record.device_seconds == 2.0 and record.cost_usd > 0  # device time is cost in every state


def _job(person: Person, rid: str = "req_1") -> dict[str, Any]:
    return make_job(
        rid, "tiny", [1, 2, 3, 4, 5, 6, 7], {"max_tokens": 5}, tenant_id=str(person.key.tenant_id),
        api_key_id=str(person.key.pk),
    )  # fmt: skip


def test_it_keeps_a_told_error_unbilled_when_the_worker_reports_completion_later(
    owner: Person, make_usage_event: Any
) -> None:
    record_told_error(_job(owner), "service_unavailable", started=True)
    record = UsageRecord.objects.get(request_id="req_1")
    assert (record.status, record.told_error, record.revenue_usd) == ("failed", "service_unavailable", 0)
    # Redis came back with the job, the worker ran it to its end: its measurements, not its bill.
    assert record_usage(make_usage_event(owner, status="completed", timings=TIMINGS))
    assert not record_usage(make_usage_event(owner, status="completed", timings=TIMINGS))  # redelivered
    record.refresh_from_db()
    assert (record.status, record.completion_tokens, record.revenue_usd) == ("failed", 5, Decimal(0))
    assert record.device_seconds == 2.0 and record.cost_usd > 0
    assert UsageRecord.objects.count() == 1


def test_it_keeps_a_told_error_unbilled_when_the_worker_reported_first(
    owner: Person, make_usage_event: Any
) -> None:
    assert record_usage(make_usage_event(owner, status="completed", timings=TIMINGS))
    record_told_error(_job(owner), "worker_lost", started=True)
    record = UsageRecord.objects.get(request_id="req_1")
    assert (record.status, record.finish_reason, record.revenue_usd) == ("failed", "worker_lost", Decimal(0))
    assert record.completion_tokens == 5 and record.cost_usd > 0


def test_it_records_a_withdrawn_job_that_never_ran_as_rejected(owner: Person, make_usage_event: Any) -> None:
    record_told_error(_job(owner), "service_unavailable", started=False)
    assert record_usage(make_usage_event(owner, status="rejected", finish_reason="cancelled", timings={}))
    record = UsageRecord.objects.get(request_id="req_1")
    assert (record.status, record.revenue_usd, record.cost_usd) == ("rejected", 0, 0)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64))


def _events(transport: MemoryTransport, rid: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        return [event async for event in transport.events(rid)]

    return asyncio.run(asyncio.wait_for(read(), 30))


def test_it_never_starts_a_job_cancelled_while_it_waited(engine: LLMEngine) -> None:
    usage: list[dict[str, Any]] = []
    transport = MemoryTransport(usage.append)
    worker = Worker(engine, transport)
    transport.submit(make_job("gone", "tiny", [1, 2, 3], {"max_tokens": 50, "ignore_eos": True}))
    transport.cancel("gone")  # before any worker took it
    worker.run_once()
    assert not engine.has_unfinished_requests()
    [event] = _events(transport, "gone")
    assert (event["type"], event["status"], event["code"]) == ("error", "rejected", "cancelled")
    assert [(u["status"], u["completion_tokens"]) for u in usage] == [("rejected", 0)]


def test_it_measures_the_device_time_of_a_request_that_timed_out(engine: LLMEngine) -> None:
    usage: list[dict[str, Any]] = []
    transport = MemoryTransport(usage.append)
    worker = Worker(engine, transport)
    job = make_job("slow", "tiny", [1, 2, 3], {"max_tokens": 100, "ignore_eos": True}, timeout_s=60)
    transport.submit(job)
    for _ in range(4):
        worker.run_once()
    worker._active["slow"].job.submitted_at = time.time() - 61  # the deadline passes mid-generation
    worker.run_once()
    events = _events(transport, "slow")
    assert (events[-1]["type"], events[-1]["code"], events[-1]["http_status"]) == (
        "error",
        "request_timeout",
        504,
    )
    [record] = usage
    assert (record["status"], record["finish_reason"]) == ("failed", "request_timeout")
    assert record["completion_tokens"] > 0 and record["timings"]["device_s"] > 0
