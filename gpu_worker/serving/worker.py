"""The GPU worker loop: pull jobs, feed the engine, step it, publish events, cancel, heartbeat, drain.
One loop drives both the embedded in-process mode and the Redis mode through the WorkerTransport protocol."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import InvalidRequestError
from gpu_worker.logs import job_fields
from gpu_worker.lora.request import LoRARequest
from gpu_worker.serving.protocol import (
    Event,
    ParsedJob,
    adapter_name,
    delta_events,
    done_event,
    error_event,
    error_event_for,
    is_terminal,
    parse_job,
    prompt_logprobs_event,
    started_event,
    usage_event,
)
from gpu_worker.serving.pulse import Pulse
from gpu_worker.serving.transport import Delivery, Finished, WorkerTransport
from gpu_worker.tracing import end_job_span, start_job_span
from gpu_worker.versions import engine_versions

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gpu_worker.engine.llm_engine import LLMEngine
    from gpu_worker.sequence import RequestMetrics

log = logging.getLogger("ruvon.worker")


@dataclass
class _Active:
    """What the worker tracks for one request inside the engine."""

    delivery: Delivery
    job: ParsedJob
    started_at: float
    first_token_at: float | None = None
    completion_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)
    cancel_requested: bool = False
    metrics: RequestMetrics | None = None  # the engine's, from its last output: device time so far


class Worker:
    """Runs one engine against one transport until stopped; a bad job fails alone, never the loop."""

    def __init__(
        self,
        engine: LLMEngine,
        transport: WorkerTransport,
        *,
        max_inflight: int = 64,
        idle_wait_s: float = 0.5,
        heartbeat_s: float = 2.0,
        drain_timeout_s: float = 30.0,
        served_name: str | None = None,
        name: str = "embedded",
        stall_s: float = 300.0,
    ) -> None:
        self.engine = engine
        self.served_name = served_name or engine.model_name
        self.name = name
        self.transport = transport
        self.max_inflight = max_inflight
        self.idle_wait_s = idle_wait_s
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self._active: dict[str, _Active] = {}
        self._outbox: list[tuple[str, Event]] = []
        self._finished: list[Finished] = []
        self._spans: dict[str, Span] = {}  # request id -> its span, from admission to its ending
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        # Heartbeats come from a thread, so one engine step longer than the web tier's worker timeout is not
        # a dead worker; only a loop stuck for stall_s goes silent (its requests then end worker_lost).
        self.pulse = Pulse(transport, heartbeat_s, stall_s)
        self.versions = engine_versions(engine.device)

    # ------------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Serve until stop() is called, then finish in-flight requests (up to drain_timeout_s) and return."""
        log.info(
            "worker serving %s (%s), weights %.1f MB",
            self.engine.model_name,
            self.engine.label,
            self.engine.loaded.weight_bytes / 1e6,
        )
        deadline: float | None = None
        self.pulse.start()
        try:
            while True:
                if self._stop.is_set():
                    deadline = deadline or time.monotonic() + self.drain_timeout_s
                    if not self._active or time.monotonic() > deadline:
                        break
                self._guarded_iteration()
            self._fail_all("worker_shutdown", "the worker shut down before the request finished", 503)
            self._flush()
        finally:
            self.pulse.stop()
            self.transport.close()
        log.info("worker stopped")

    def stop(self) -> None:
        """Ask the loop to stop taking jobs and drain; safe from signal handlers and other threads."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT drain gracefully (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _guarded_iteration(self) -> None:
        try:
            self.run_once(admit=not self._stop.is_set())
        except Exception:  # a transport outage must not end the process; the outbox is kept for a retry
            log.exception("worker iteration failed; retrying in 1s")
            time.sleep(1.0)

    def run_once(self, admit: bool = True) -> None:
        """One turn: admit jobs (unless draining), apply cancellations, step the engine, publish, heartbeat."""
        self.pulse.turned()
        if admit:
            self._admit_new_jobs()
        self._apply_cancellations()
        self._enforce_deadlines()
        self._track()  # the jobs just admitted stay claimed through the step that follows, however long
        if self._active or self.engine.has_unfinished_requests():
            self._step()
            self.pulse.turned()
        self._reap_orphans()
        self._flush()
        self._track()
        self._maybe_heartbeat()

    def _track(self) -> None:
        self.pulse.track([st.delivery for st in self._active.values()])

    # ----------------------------------------------------------------------------------- admission

    def _admit_new_jobs(self) -> None:
        room = self.max_inflight - len(self._active)
        if room <= 0:
            return
        idle = not self._active and not self.engine.has_unfinished_requests()
        deliveries = self.transport.fetch(room, self.idle_wait_s if idle else 0.0)
        # A job its client gave up on while it waited (or the web tier withdrew after answering an error)
        # must not run: one look at the cancel flags before any of them starts.
        fresh = [d.request_id for d in deliveries if d.request_id is not None and not d.prior_events]
        withdrawn = self.transport.cancel_requested(fresh) if fresh else set()
        for delivery in deliveries:
            if delivery.request_id in withdrawn:
                self._reject_withdrawn(delivery)
            else:
                self._admit(delivery)

    def _reject_withdrawn(self, delivery: Delivery) -> None:
        message = "the request was cancelled before it started"
        event = error_event("rejected", "cancelled", message, None, 499)
        self._finish_error(delivery, delivery.job, event, time.time(), finish_reason="cancelled")

    def _admit(self, delivery: Delivery) -> None:
        rid = delivery.request_id
        if rid is not None and rid in self._active:
            return  # our own job handed back by a reclaim after a slow heartbeat: we are still on it
        if delivery.prior_events:
            self._resolve_reclaimed(delivery)
            return
        try:
            job = parse_job(delivery.job)
        except InvalidRequestError as exc:
            self._reject_unparsed(delivery, exc)
            return
        started_at = time.time()
        late = deadline_event(job, started_at, waiting=True)
        if late is not None:  # it waited in the stream past its bound: serving it now helps nobody
            self._finish_error(delivery, job.raw, late, started_at, finish_reason=late["code"])
            return
        try:
            self._add_to_engine(job)
        except Exception as exc:  # InvalidRequestError, CapacityError or a bug: this request fails alone
            log.info("request %s not admitted: %s", job.request_id, exc, extra=job_fields(job.raw))
            self._finish_error(delivery, job.raw, error_event_for(exc), started_at)
            return
        self._active[job.request_id] = _Active(delivery, job, started_at)
        self._spans[job.request_id] = start_job_span(job.raw)
        log.info("request %s started", job.request_id, extra=job_fields(job.raw, status="running"))
        queued_s = max(0.0, started_at - job.submitted_at)
        self._outbox.append((job.request_id, started_event(job.prompt_token_ids, queued_s, self.name)))

    def _add_to_engine(self, job: ParsedJob) -> None:
        kwargs: dict[str, Any] = {"tenant": job.tenant_id, "weight": job.weight}
        if job.cache_salt is not None:
            kwargs["cache_salt"] = job.cache_salt
        adapter = self._lora_request(job)
        if adapter is not None:
            kwargs["adapter"] = adapter
        self.engine.add_request(job.request_id, job.prompt_token_ids, job.params, **kwargs)

    def _lora_request(self, job: ParsedJob) -> LoRARequest | None:
        """Return the adapter a job runs with: a registry adapter by its path and sha256, a start-up one
        (`--lora NAME=PATH`) by its name alone; None for the base model or an adapter merged into it."""
        adapter = job.adapter
        if adapter is None:
            return None
        if "path" in adapter:
            return LoRARequest(adapter["name"], adapter["path"], adapter["sha256"])
        if adapter["name"] not in self.engine.named_loras:
            model = f"{job.model}:{adapter['name']}"
            raise InvalidRequestError(f"the model {model!r} does not exist on this worker", "model")
        return self.engine.named_loras[adapter["name"]]

    def _reject_unparsed(self, delivery: Delivery, exc: InvalidRequestError) -> None:
        if delivery.request_id is None:
            log.warning("dropping a job without a request_id: %s", exc.message)
            self.transport.discard(delivery)
            return
        self._finish_error(delivery, delivery.job, error_event_for(exc), time.time())

    def _resolve_reclaimed(self, delivery: Delivery) -> None:
        """A dead worker's job: done if it ended, failed if it had streamed (a restart would repeat tokens)."""
        if any(is_terminal(e) for e in delivery.prior_events) or delivery.request_id is None:
            self.transport.discard(delivery)
            return
        tokens = sum(len(e.get("token_ids", [])) for e in delivery.prior_events if e.get("type") == "delta")
        message = "the worker serving this request stopped; please retry"
        event = error_event("failed", "worker_lost", message, None, 503)
        self._finish_error(delivery, delivery.job, event, time.time(), tokens, finish_reason="worker_lost")

    # ------------------------------------------------------------------------------------ stepping

    def _apply_cancellations(self) -> None:
        pending = [rid for rid, st in self._active.items() if not st.cancel_requested]
        if not pending:
            return
        for rid in self.transport.cancel_requested(pending):
            self._active[rid].cancel_requested = True
            try:
                self.engine.abort_request(rid)
            except Exception:  # the reaper below still ends it as cancelled
                log.exception("abort of %s failed", rid)

    def _enforce_deadlines(self) -> None:
        """End the requests past max_queue_s (still waiting for the engine) or timeout_s, freeing their blocks."""
        now = time.time()
        for rid, st in list(self._active.items()):
            event = deadline_event(st.job, now, waiting=self.engine.is_waiting(rid))
            if event is None:
                continue
            log.info("request %s: %s", rid, event["message"], extra=job_fields(st.job.raw))
            self.engine.abort_request(rid)  # its final output from the next step is ignored: no longer active
            del self._active[rid]
            self._finish_error(
                st.delivery,
                st.job.raw,
                event,
                st.started_at,
                st.completion_tokens,
                finish_reason=event["code"],
                timings=self._timings(st, st.metrics, now),
            )

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except (
            Exception
        ) as exc:  # the engine fails a request that breaks a step alone; this is a bug of its own
            log.exception("engine step failed; failing %d requests", len(self._active))
            self._fail_all("engine_error", f"the engine failed: {type(exc).__name__}: {exc}", 500)
            return
        now = time.time()
        for output in outputs:
            st = self._active.get(output.request_id)
            if st is not None:
                self._record_output(st, output, now)

    def _record_output(self, st: _Active, output: Any, now: float) -> None:
        rid = st.job.request_id
        st.metrics = output.metrics
        prompt_event = prompt_logprobs_event(output)
        if prompt_event is not None:
            self._outbox.append((rid, prompt_event))
        for event in delta_events(output):
            self._outbox.append((rid, event))
            st.completion_tokens += len(event["token_ids"])
            if event["token_ids"] and st.first_token_at is None:
                st.first_token_at = output.metrics.first_token_time or now
            if event["finish_reason"] is not None:
                st.finish_reasons[event["index"]] = event["finish_reason"]
        if output.finished and output.error is not None:  # the engine failed this request alone
            if output.error_code == "adapter_error":  # its adapter cannot be read: it never ran
                event = error_event("rejected", "adapter_error", output.error, "model", 400)
            elif output.error_code == "invalid_json_schema":  # its grammar did not compile: it never ran
                event = error_event("rejected", "invalid_request_error", output.error, "json_schema", 400)
            else:
                event = error_event("failed", "engine_error", output.error, None, 500)
            self._finish_error(st.delivery, st.job.raw, event, st.started_at, st.completion_tokens)
            self._active.pop(rid, None)
        elif output.finished:
            self._finish_done(st, output.metrics, now)

    def _reap_orphans(self) -> None:
        """Requests the engine no longer holds but never ended (a bug or a lost abort) still get a terminal."""
        if not self._active or self.engine.has_unfinished_requests():
            return
        for rid, st in list(self._active.items()):
            if st.cancel_requested:
                self._finish_done(st, None, time.time())
            else:
                event = error_event("failed", "internal_error", "the engine dropped the request", None, 500)
                self._finish_error(st.delivery, st.job.raw, event, st.started_at)
                del self._active[rid]

    def _fail_all(self, code: str, message: str, http_status: int) -> None:
        for rid, st in list(self._active.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            event = error_event("failed", code, message, None, http_status)
            timings = self._timings(st, st.metrics, time.time())
            self._finish_error(
                st.delivery, st.job.raw, event, st.started_at, st.completion_tokens, timings=timings
            )
        self._active.clear()
        try:
            self.engine.step()  # hands back the aborted requests' final outputs, so the engine forgets them
        except Exception:
            log.exception("engine step after aborting failed")

    # ----------------------------------------------------------------------------------- endings

    def _finish_done(self, st: _Active, metrics: RequestMetrics | None, now: float) -> None:
        job = st.job
        status = "cancelled" if st.cancel_requested else "completed"
        finished_at = (metrics.finished_time if metrics else None) or now
        cached = (metrics.num_cached_tokens if metrics else 0) or 0
        usage = {
            "prompt_tokens": len(job.prompt_token_ids),
            "completion_tokens": st.completion_tokens,
            "cached_tokens": cached,
        }
        timings = self._timings(st, metrics, finished_at)
        adapter = adapter_name(job.raw.get("adapter"))
        terminal = done_event(usage, timings, status, adapter)
        finish_reason = "abort" if st.cancel_requested else st.finish_reasons.get(0)
        record = usage_event(
            job,
            **usage,
            status=status,
            finish_reason=finish_reason,
            started_at=st.started_at,
            first_token_at=st.first_token_at,
            finished_at=finished_at,
            timings=timings,
            adapter=adapter,
        )
        self._finished.append(Finished(st.delivery, job.request_id, terminal, record))
        self._active.pop(job.request_id, None)

    def _timings(self, st: _Active, metrics: RequestMetrics | None, finished_at: float) -> dict[str, Any]:
        submitted = st.job.submitted_at
        scheduled = (metrics.first_scheduled_time if metrics else None) or st.started_at
        first_token = st.first_token_at
        n = max(1, st.job.params.n)
        per_choice = st.completion_tokens / n
        decode_s = finished_at - first_token if first_token else 0.0
        tpot = decode_s / (per_choice - 1) if first_token and per_choice > 1 else None
        return {
            "queued_s": max(0.0, scheduled - submitted),
            "ttft_s": max(0.0, first_token - submitted) if first_token else None,
            "e2e_s": max(0.0, finished_at - submitted),
            "tpot_s": tpot,
            # Decode speed: tokens after each choice's first, per second (n / tpot_s).
            "tokens_per_s": (st.completion_tokens - n) / decode_s if tpot and decode_s > 0 else None,
            # This request's share of the engine's measured step time (gpu_worker/engine/cost.py).
            "device_s": metrics.device_seconds if metrics else 0.0,
            # Speculative decoding: draft tokens verified for this request, and how many were accepted.
            "draft_tokens": metrics.num_draft_tokens if metrics else 0,
            "accepted_draft_tokens": metrics.num_accepted_tokens if metrics else 0,
        }

    def _finish_error(
        self,
        delivery: Delivery,
        raw: dict[str, Any],
        event: Event,
        started_at: float,
        completion_tokens: int = 0,
        finish_reason: str | None = None,
        timings: dict[str, Any] | None = None,
    ) -> None:
        """End a request with an error event; `timings` (device_s above all) of one that ran are still kept,
        so its device time is charged as cost though the request is not billed."""
        ids = raw.get("prompt_token_ids")
        record = usage_event(
            raw,
            prompt_tokens=len(ids) if isinstance(ids, list) else 0,
            completion_tokens=completion_tokens,
            cached_tokens=0,
            status=event["status"],
            finish_reason=finish_reason,
            started_at=started_at,
            first_token_at=None,
            finished_at=time.time(),
            timings=timings,
        )
        self._finished.append(Finished(delivery, record["request_id"], event, record))

    def _flush(self) -> None:
        # Deltas go out before terminals so a reader sees them in order; each list is kept until it is sent.
        if self._outbox:
            self.transport.publish(self._outbox)
            self._outbox = []
        if self._finished:
            self.transport.finish(self._finished)
            for item in self._finished:
                self._log_ending(item)
            self._finished = []

    def _log_ending(self, item: Finished) -> None:
        status = str(item.terminal.get("status"))
        span = self._spans.pop(item.request_id, None) or start_job_span(item.delivery.job)
        end_job_span(span, status)
        fields = job_fields(item.delivery.job, status=status)
        log.info("request %s ended %s", item.request_id, status, extra=fields)

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < self.heartbeat_s:
            return
        self._last_heartbeat = now
        self._apply_adapter_control()
        self.pulse.beat(self.info())

    def _apply_adapter_control(self) -> None:
        """Act on the registry's adapter messages (protocol.adapter_control_message), read at heartbeat pace:
        "load" starts reading an adapter before a request needs it, "unload" drops this worker's copies."""
        manager = getattr(self.engine, "adapters", None)
        for message in self.transport.read_control():
            adapter = message.get("adapter") if isinstance(message, dict) else None
            if manager is None or not isinstance(adapter, dict) or not isinstance(adapter.get("name"), str):
                continue
            name, sha256 = adapter["name"], adapter.get("sha256")
            if message.get("op") == "unload":
                dropped = manager.forget(name, sha256 if isinstance(sha256, str) else None)
                log.info("adapter %s unloaded (%d copies dropped)", name, dropped)
            elif (
                message.get("op") == "load"
                and isinstance(adapter.get("path"), str)
                and isinstance(sha256, str)
            ):
                manager.prefetch(LoRARequest(name, adapter["path"], sha256))

    def idle(self) -> bool:
        """Return whether the worker holds no job and has nothing left to publish."""
        return not self._active and not self._outbox and not self._finished

    def info(self) -> dict[str, Any]:
        """Return what this worker serves and how busy it is (published with every heartbeat)."""
        return {
            "model": self.served_name,
            "engine_model": self.engine.model_name,
            "label": self.engine.label,
            "max_model_len": self.engine.max_model_len,
            # What adapter uploads are checked against (None: this worker serves no adapters), and its
            # start-up adapters, which the web tier serves to every tenant as "<model>:NAME".
            "lora": self.engine.lora_info(),
            "loras": sorted(self.engine.named_loras),
            "active": len(self._active),
            "draining": self._stop.is_set(),  # taking no more jobs: /health does not count it
            "versions": self.versions,
            "stats": self.engine.stats(),
            "time": time.time(),
        }


def deadline_event(job: ParsedJob, now: float, waiting: bool) -> Event | None:
    """Return the error that ends a job past its deadline: queue_timeout (503, rejected) while it still
    waits to run, request_timeout (504, failed) once it has run too long; None while it is in time."""
    age = now - job.submitted_at
    if job.timeout_s is not None and age > job.timeout_s:
        message = f"the request did not finish within {job.timeout_s:g}s (request timeout)"
        return error_event("failed", "request_timeout", message, None, 504)
    if waiting and job.max_queue_s is not None and age > job.max_queue_s:
        message = f"the request waited {age:.1f}s for a free slot (limit {job.max_queue_s:g}s); retry later"
        return error_event("rejected", "queue_timeout", message, None, 503)
    return None
