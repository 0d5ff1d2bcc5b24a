"""The wire protocol between the web tier and the GPU worker: job and event dicts, their validation, and
the conversion of engine outputs into events. Plain JSON-able dicts; no Django, no Redis, no torch."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpu_worker.config import SamplingParams
from gpu_worker.errors import CapacityError, InvalidRequestError

if TYPE_CHECKING:  # the engine pulls in torch; the web tier only needs the dict shapes
    from gpu_worker.engine.outputs import RequestOutput
    from gpu_worker.sequence import TokenLogprob

Job = dict[str, Any]
Event = dict[str, Any]

TERMINAL_TYPES = frozenset({"done", "error"})
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_TUPLE_FIELDS = {"stop", "stop_token_ids"}
_INT_FIELDS = {"n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"}
_FLOAT_FIELDS = {
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
}
_NULLABLE_FIELDS = {"max_tokens", "seed", "logprobs", "prompt_logprobs"}  # None means something here
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def request_stream(model: str) -> str:
    """Return the Redis stream that holds the jobs for one served model."""
    return f"ruvon:requests:{model}"


def events_stream(request_id: str) -> str:
    """Return the Redis stream that carries one request's events."""
    return f"ruvon:events:{request_id}"


def cancel_key(request_id: str) -> str:
    """Return the Redis key whose existence asks the worker to cancel a request."""
    return f"ruvon:cancel:{request_id}"


def workers_key(model: str) -> str:
    """Return the Redis hash of live workers' heartbeats (consumer name -> JSON info) for one model."""
    return f"ruvon:workers:{model}"


def waiting_key(model: str) -> str:
    """Return the Redis hash of the jobs no worker has taken yet (request id -> token budget), for one model."""
    return f"ruvon:waiting:{model}"


def waiting_tokens_key(model: str) -> str:
    """Return the Redis counter of the token budgets of the jobs in waiting_key(model)."""
    return f"ruvon:waiting-tokens:{model}"


def waiting_tenants_key(model: str) -> str:
    """Return the Redis hash of who waits in waiting_key(model): "r:<request id>" -> its tenant, and per tenant
    "n:<tenant>" its waiting jobs and "t:<tenant>" their token budgets."""
    return f"ruvon:waiting-tenants:{model}"


def waiting_keys(model: str) -> list[str]:
    """Return the keys of the waiting count in the order the admission and dequeue scripts take them."""
    return [waiting_key(model), waiting_tokens_key(model), waiting_tenants_key(model)]


def tenant_queue_bounds(max_queue: int, max_queue_tokens: int, share: float) -> tuple[int, int]:
    """Return the most requests and tokens one tenant may have waiting: `share` of the queue's bounds (at
    least one request), so that one tenant filling the queue leaves room for the others."""
    if not 0 < share <= 1:
        raise ValueError(f"the queue share of a tenant must be in (0, 1], not {share}")
    return max(1, int(max_queue * share)), max(1, int(max_queue_tokens * share))


def tenant_queue_full(waiting: int, limit: int) -> CapacityError:
    """Return the error for a tenant that already has `limit` requests waiting."""
    return CapacityError(
        f"your organisation already has {waiting} requests waiting, the most one organisation may hold in "
        f"this server's queue ({limit}); retry shortly"
    )


def tenant_tokens_full(waiting_tokens: int, tokens: int, limit: int) -> CapacityError:
    """Return the error for a tenant whose waiting requests' token budgets leave no room for `tokens`."""
    return CapacityError(
        f"your organisation's waiting requests already need up to {waiting_tokens} tokens, and this one up to "
        f"{tokens}: one organisation may hold {limit} of this server's queue; retry shortly"
    )


def adapter_control_key(model: str) -> str:
    """Return the Redis stream of adapter control messages (adapter_control_message) for the workers of one
    model. Every worker reads all of it from the moment it starts (XREAD, no consumer group)."""
    return f"ruvon:adapter-control:{model}"


USAGE_STREAM = "ruvon:usage"
ADAPTER_CONTROL_MAXLEN = 1000  # a worker that falls this far behind has restarted: it holds nothing stale
ADAPTER_OPS = frozenset({"load", "unload"})


# ---------------------------------------------------------------------------------------------- jobs


def make_job(
    request_id: str,
    model: str,
    prompt_token_ids: list[int],
    params: dict[str, Any] | SamplingParams,
    *,
    tenant_id: str = "default",
    api_key_id: str | None = None,
    weight: float = 1.0,
    adapter: dict[str, str] | None = None,
    cache_salt: str | None = None,
    user: str | None = None,
    submitted_at: float | None = None,
    token_budget: int | None = None,
    reserved_tokens: int = 0,
    chat_user_id: str | None = None,
    max_queue_s: float | None = None,
    timeout_s: float | None = None,
    client_request_id: str | None = None,
    trace: dict[str, str] | None = None,
) -> Job:
    """Return a job dict in the wire format; SamplingParams are flattened to their fields.

    token_budget: the most tokens the job can use (prompt + n x max completion), what admission counts;
    reserved_tokens: what the API key's (or chat user's) token bucket was charged for it; chat_user_id: the
    web chat's signed-in user, whose buckets admission drew from (None: an API request); max_queue_s / timeout_s: how long
    it may wait for a worker, and live in all, counted from submitted_at (None: no bound); adapter: the
    LoRA adapter, a registry one {"name": "<tenant id>/<adapter>", "path": absolute directory, "sha256": of
    its weights file} (adapter_ref builds it), a worker's start-up one {"name": NAME} (served_adapter_ref),
    or None;
    user: the client's `user` field, which the worker only copies into the usage record;
    client_request_id: the caller's own X-Request-Id, for the worker's log lines; trace: the web request's span
    context as W3C headers (gpu_worker.tracing.carrier), the parent of the worker's span."""
    if isinstance(params, SamplingParams):
        params = sampling_params_to_dict(params)
    return {
        "request_id": request_id,
        "model": model,
        "prompt_token_ids": list(prompt_token_ids),
        "params": dict(params),
        "tenant_id": tenant_id,
        "api_key_id": api_key_id,
        "weight": weight,
        "adapter": adapter,
        "cache_salt": cache_salt,
        "user": user,
        "submitted_at": time.time() if submitted_at is None else submitted_at,
        "token_budget": len(prompt_token_ids) if token_budget is None else token_budget,
        "reserved_tokens": reserved_tokens,
        "chat_user_id": chat_user_id,
        "max_queue_s": max_queue_s,
        "timeout_s": timeout_s,
        "client_request_id": client_request_id,
        "trace": trace,
    }


def adapter_ref(name: str, path: str, sha256: str) -> dict[str, str]:
    """Return a job's "adapter" value: a globally unique name, the adapter directory on a filesystem the
    worker shares, and the hex sha256 of its weights file (the worker checks it before use)."""
    return {"name": name, "path": path, "sha256": sha256}


def served_adapter_ref(name: str) -> dict[str, str]:
    """Return a job's "adapter" value for the workers' start-up adapter NAME (`--lora NAME=PATH`): the name
    alone, since every worker of the model read it when it started."""
    return {"name": name}


def parse_adapter(value: Any) -> dict[str, str] | None:
    """Return a job's validated "adapter" (None: the base model): {name, path, sha256} or a start-up
    adapter's {name}; raise InvalidRequestError if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) not in ({"name"}, {"name", "path", "sha256"}):
        raise InvalidRequestError("adapter must be null, {name} or {name, path, sha256}", param="adapter")
    name = value["name"]
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("adapter.name must be a non-empty string", param="adapter")
    if set(value) == {"name"}:
        return {"name": name}
    path, sha256 = value["path"], value["sha256"]
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidRequestError("adapter.path must be an absolute directory", param="adapter")
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidRequestError("adapter.sha256 must be 64 lowercase hex digits", param="adapter")
    return {"name": name, "path": path, "sha256": sha256}


def adapter_name(value: Any) -> str | None:
    """Return the adapter name a job's raw "adapter" value carries (None: none, or unreadable)."""
    name = value.get("name") if isinstance(value, dict) else None
    return name if isinstance(name, str) and name else None


def job_tenant(job: Job) -> str:
    """Return the tenant a job is for ("default" for a job that names none)."""
    return str(job.get("tenant_id") or "default")


def job_token_budget(job: Job) -> int:
    """Return what admission counts for a job: its token_budget, else its prompt length."""
    budget = job.get("token_budget")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0:
        return budget
    ids = job.get("prompt_token_ids")
    return len(ids) if isinstance(ids, list) else 0


def sampling_params_to_dict(params: SamplingParams) -> dict[str, Any]:
    """Return the JSON-able fields of SamplingParams (logit_bias keys become strings, as JSON needs)."""
    out = dataclasses.asdict(params)
    out["stop"] = list(params.stop)
    out["stop_token_ids"] = list(params.stop_token_ids)
    out["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    return out


def sampling_params_from_dict(params: dict[str, Any]) -> SamplingParams:
    """Build SamplingParams from the wire dict; raise InvalidRequestError naming the first bad field."""
    if not isinstance(params, dict):
        raise InvalidRequestError("params must be an object", param="params")
    unknown = sorted(set(params) - _SAMPLING_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown sampling parameter {unknown[0]!r}", param=unknown[0])
    kwargs = {k: v for k, v in params.items() if v is not None or k in _NULLABLE_FIELDS}
    for name, value in kwargs.items():
        _check_type(name, value)
    for name in _TUPLE_FIELDS & kwargs.keys():
        kwargs[name] = _as_tuple(name, kwargs[name])
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = _parse_logit_bias(kwargs["logit_bias"])
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError:
        raise
    except (TypeError, ValueError) as exc:  # wrong types: a comparison or conversion in validate() failed
        raise InvalidRequestError(f"invalid sampling parameters: {exc}", param="params") from exc


def _check_type(name: str, value: Any) -> None:
    if value is None:
        return
    if name in _INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequestError(f"{name} must be an integer", param=name)
    if name in _FLOAT_FIELDS and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise InvalidRequestError(f"{name} must be a finite number", param=name)


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    item_type = str if name == "stop" else int
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(v, item_type) and not isinstance(v, bool) for v in items
    ):
        raise InvalidRequestError(f"{name} must be a list of {item_type.__name__}s", param=name)
    return tuple(items)


def _parse_logit_bias(raw: Any) -> dict[int, float]:
    if not isinstance(raw, dict):
        raise InvalidRequestError("logit_bias must map token ids to numbers", param="logit_bias")
    try:
        return {int(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError("logit_bias must map token ids to numbers", param="logit_bias") from exc


@dataclass
class ParsedJob:
    """A job that passed validation, with its params turned into SamplingParams."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant_id: str
    api_key_id: str | None
    weight: float
    adapter: dict[str, str] | None  # {"name", "path", "sha256"} or a start-up {"name"} (parse_adapter)
    submitted_at: float
    raw: Job = field(repr=False)
    cache_salt: str | None = None  # joins the tenant in the prefix-cache isolation key
    # Deadlines from submitted_at: queue_timeout if not running after max_queue_s, request_timeout if not
    # finished after timeout_s.
    max_queue_s: float | None = None
    timeout_s: float | None = None


def parse_job(job: Any) -> ParsedJob:
    """Validate a job dict; raise InvalidRequestError naming the first bad field."""
    if not isinstance(job, dict):
        raise InvalidRequestError("a job must be an object", param=None)
    request_id = job.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
    ids = job.get("prompt_token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequestError("prompt_token_ids must be a list of integers", param="prompt_token_ids")
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    weight = job.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight < math.inf:
        raise InvalidRequestError("weight must be a positive number", param="weight")
    cache_salt = job.get("cache_salt")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise InvalidRequestError("cache_salt must be a string", param="cache_salt")
    submitted_at = job.get("submitted_at")
    if not isinstance(submitted_at, int | float):
        submitted_at = time.time()
    return ParsedJob(
        request_id=request_id,
        model=str(job.get("model", "")),
        prompt_token_ids=ids,
        params=sampling_params_from_dict(job.get("params", {})),
        tenant_id=job_tenant(job),
        api_key_id=job.get("api_key_id"),
        weight=float(weight),
        adapter=parse_adapter(job.get("adapter")),
        submitted_at=float(submitted_at),
        raw=job,
        cache_salt=cache_salt,
        max_queue_s=_optional_seconds(job, "max_queue_s"),
        timeout_s=_optional_seconds(job, "timeout_s"),
    )


def _optional_seconds(job: Job, name: str) -> float | None:
    value = job.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidRequestError(f"{name} must be a positive number of seconds", param=name)
    return float(value)


# -------------------------------------------------------------------------------------------- events


def is_terminal(event: Event) -> bool:
    """Return whether an event ends its request's stream."""
    return event.get("type") in TERMINAL_TYPES


def started_event(prompt_token_ids: list[int], queued_s: float, worker: str = "") -> Event:
    return {
        "type": "started",
        "prompt_token_ids": list(prompt_token_ids),
        "queued_s": queued_s,
        "worker": worker,
    }


def done_event(
    usage: dict[str, int], timings: dict[str, float | None], status: str, adapter: str | None = None
) -> Event:
    return {"type": "done", "usage": usage, "timings": timings, "status": status, "adapter": adapter}


def error_event(status: str, code: str, message: str, param: str | None, http_status: int) -> Event:
    return {
        "type": "error",
        "status": status,
        "code": code,
        "message": message,
        "param": param,
        "http_status": http_status,
    }


def error_event_for(exc: BaseException) -> Event:
    """Return the terminal error event for an exception: user errors are rejected, the rest failed."""
    if isinstance(exc, InvalidRequestError):
        return error_event("rejected", exc.code or "invalid_request_error", exc.message, exc.param, 400)
    if isinstance(exc, CapacityError):
        return error_event("rejected", "capacity_exceeded", str(exc) or "the server is busy", None, 503)
    message = f"internal error: {type(exc).__name__}: {exc}"
    return error_event("failed", "internal_error", message, None, 500)


def logprob_to_dict(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token_id": lp.token_id,
        "token": lp.token,
        "bytes": list(lp.bytes),
        "logprob": lp.logprob,
        "top": [[tid, tok, logprob] for tid, tok, logprob in lp.top],
    }


def prompt_logprobs_event(output: RequestOutput) -> Event | None:
    """Return the prompt_logprobs event if this output carries them (the first output only)."""
    if output.prompt_logprobs is None:
        return None
    logprobs = [None if lp is None else logprob_to_dict(lp) for lp in output.prompt_logprobs]
    return {"type": "prompt_logprobs", "logprobs": logprobs}


def delta_events(output: RequestOutput) -> list[Event]:
    """Return one delta event per choice that has news in this step's output."""
    return [
        {
            "type": "delta",
            "index": choice.index,
            "text": choice.text,
            "token_ids": list(choice.token_ids),
            "logprobs": None if choice.logprobs is None else [logprob_to_dict(lp) for lp in choice.logprobs],
            "finish_reason": choice.finish_reason,
        }
        for choice in output.outputs
    ]


def coalesce_deltas(events: list[Event]) -> list[Event]:
    """Return the events with each run of consecutive deltas merged into one delta per choice (at the place
    of its first): text and token ids concatenated, logprobs kept per token in order, the finish reason of
    the last. A reader that fell behind thus sends one chunk per choice for what waited, not one per token;
    every other event, and the order of events around a run, stays as it was."""
    out: list[Event] = []
    run: dict[int, Event] = {}  # choice index -> its merged delta, in the run of deltas at out's end
    for event in events:
        if event.get("type") != "delta":
            out.append(event)
            run = {}
            continue
        merged = run.get(event["index"])
        if merged is None:
            run[event["index"]] = merged = dict(event)  # a copy: other readers may hold the event
            out.append(merged)
            continue
        merged["text"] += event["text"]
        merged["token_ids"] = merged["token_ids"] + event["token_ids"]
        if event["logprobs"] is not None:
            merged["logprobs"] = (merged["logprobs"] or []) + event["logprobs"]
        merged["finish_reason"] = event["finish_reason"] or merged["finish_reason"]
    return out


def usage_event(
    job: ParsedJob | Job,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    status: str,
    finish_reason: str | None,
    started_at: float | None,
    first_token_at: float | None,
    finished_at: float,
    timings: dict[str, Any] | None = None,
    adapter: str | None = None,
) -> Event:
    """Return the durable usage record for a request that reached the worker; `timings` are the done
    event's (queued_s, ttft_s, e2e_s, tpot_s, tokens_per_s, device_s), empty when it never ran; `adapter`
    the name of the adapter it ran with (default: the one its job names)."""
    raw = job.raw if isinstance(job, ParsedJob) else job
    return {
        "request_id": str(raw.get("request_id", "")),
        "tenant_id": str(raw.get("tenant_id") or "default"),
        "api_key_id": raw.get("api_key_id"),
        "model": str(raw.get("model", "")),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "reserved_tokens": raw.get("reserved_tokens") or 0,  # drawn from the key's token bucket at admission
        "chat_user_id": raw.get("chat_user_id"),  # or from this chat user's
        "status": status,
        "finish_reason": finish_reason,
        "submitted_at": raw.get("submitted_at"),
        "started_at": started_at,
        "first_token_at": first_token_at,
        "finished_at": finished_at,
        "adapter": adapter or adapter_name(raw.get("adapter")),
        "user": raw.get("user") if isinstance(raw.get("user"), str) else None,
        "timings": dict(timings or {}),
    }


# -------------------------------------------------------------------------------------------- adapters


def adapter_control_message(op: str, adapter: dict[str, str]) -> dict[str, Any]:
    """Return a control message for the workers: "load" (fetch and verify `adapter` = {"name", "path",
    "sha256"} now, before a request needs it) or "unload" (drop every copy of `adapter["name"]`, or only the
    one with `adapter["sha256"]` when given)."""
    if op not in ADAPTER_OPS:
        raise ValueError(f"unknown adapter control op {op!r}")
    return {"op": op, "adapter": dict(adapter), "time": time.time()}
