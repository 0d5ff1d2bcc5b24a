"""The web chat's websocket (/ws/chat/): a logged-in user sends messages, tokens stream back as they are made.
Cancels the request when the browser says stop or goes away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from channels.auth import get_user
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from accounts.limits import Caller, QuotaExceeded, RateLimited, admit, chat_limits, release, reserved_tokens
from gpu_worker.errors import CapacityError, InvalidRequestError
from gpu_worker.serving.protocol import make_job, sampling_params_from_dict, sampling_params_to_dict
from inference.adapters.registry import AnyAdapter, resolve_adapter
from inference.billing import check_budget
from inference.errors import ApiError, from_error_event
from inference.runs import JobRun
from inference.services import engine_seed, job_adapter, prompt_budget, with_default_max_tokens
from inference.serving import ServedModel, served_model
from inference.transport import ModelLoading

logger = logging.getLogger("ruvon.chat")

CHAT_PARAMS = {"temperature", "top_p", "max_tokens", "seed"}  # what the chat page may set
MAX_MESSAGES = 200
ROLES = {"system", "user", "assistant"}


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """One chat session: at most one generation at a time, streamed as delta/done/error JSON messages. A user's
    sockets share their requests- and tokens-per-minute buckets (accounts.limits.chat_limits), so opening more
    sockets does not buy more generations."""

    # No channel layer: nothing is sent to this socket from other processes, and with one (Redis) a Redis
    # restart would end every open chat with it.
    channel_layer_alias = "unused"
    run: JobRun | None = None
    stream_task: asyncio.Task[None] | None = None
    tenant_id = ""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)  # before accept: the handshake is refused
            return
        tenant_id = await _tenant_id_of(user)
        if tenant_id is None:
            await self.close(code=4403)  # usage must be billed to a tenant
            return
        self.tenant_id = tenant_id
        await self.accept()
        try:
            _client, served = await served_model()
        except ModelLoading as exc:
            await self._send_error("model_loading", str(exc), None)
            await self.close(code=1013)  # "try again later"
            return
        await self.send_json({"type": "ready", "model": {"model": served.name, "label": served.label}})

    async def disconnect(self, code: int) -> None:
        # Nobody reads the rest: stop streaming, and let the worker end the request as cancelled.
        if self.stream_task is not None:
            self.stream_task.cancel()
        if self.run is not None:
            await self.run.close()

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        try:
            content = await self.decode_json(text_data) if text_data else None
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
            await self._send_error("invalid_request_error", "messages must be JSON text", None)
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "cancel":
            await self._cancel_current()
            return
        if self.stream_task is not None and not self.stream_task.done():
            await self._send_error("busy", 'a reply is still streaming; send {"type": "cancel"} first', None)
            return
        # Checked again on every message: a socket outlives its session (signed out, password changed, user
        # deactivated), the tenant's deactivation and the user's removal from it.
        user = await _signed_in_user(self.scope)
        tenant = await _tenant(self.tenant_id, user) if user.is_authenticated else None
        if tenant is None:
            signed_in = user.is_authenticated
            reason = "a member of an active tenant" if signed_in else "signed in: sign in again"
            await self._send_error("permission_denied", f"you are no longer {reason}", None)
            await self.close(code=4403 if signed_in else 4401)
            return
        limits = chat_limits(self.tenant_id, user.pk)
        try:
            # The same tenant budget the API enforces; chat traffic is billed like API traffic.
            await check_budget(tenant)
            client, served = await served_model()
            # A LoRA adapter as the API takes one: "<base>:<adapter>", the tenant's ready one or a start-up one.
            adapter = await resolve_adapter(tenant, _requested_model(content), served)
            job = self._build_job(content, served, adapter, limits, str(user.pk))
            # Last, so that nothing refused above is counted; the usage record settles the estimate drawn.
            await admit(limits, job["token_budget"])
        except InvalidRequestError as exc:
            await self._send_error("invalid_request_error", exc.message, exc.param)
            return
        except QuotaExceeded as exc:
            await self._send_error("insufficient_quota", str(exc), None)
            return
        except RateLimited as exc:
            await self._send_error("rate_limit_exceeded", exc.message, None, retry_after=exc.retry_after)
            return
        except ApiError as exc:  # model_not_found
            await self._send_api_error(exc)
            return
        except Exception:  # the transport is down (Redis went away): tell the page, keep the socket
            logger.exception("chat submission failed")
            await self._send_unavailable()
            return
        run = JobRun(client, job)
        try:
            await client.submit(job)
        except CapacityError as exc:
            await release(limits, job["token_budget"])  # it never ran: it costs the user nothing
            await self._send_error("capacity_exceeded", str(exc), None)
            return
        except Exception as exc:  # it may have been queued all the same: withdraw it, record it unbilled
            logger.warning("chat submission failed: %s", exc)
            await run.fail(exc)
            await self._send_unavailable()
            return
        self.run = run
        await self.send_json({"type": "started", "request_id": job["request_id"]})
        self.stream_task = asyncio.create_task(self._stream(run, time.monotonic()))

    def _build_job(
        self,
        content: dict[str, Any],
        served: ServedModel,
        adapter: AnyAdapter | None,
        limits: Caller,
        user_id: str,
    ) -> dict[str, Any]:
        messages = _check_messages(content.get("messages"))
        raw = content.get("params") or {}
        if not isinstance(raw, dict) or not set(raw) <= CHAT_PARAMS:
            raise InvalidRequestError(f"params may only set {sorted(CHAT_PARAMS)}", param="params")
        tokenizer = served.tokenizer
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if served.max_model_len is not None and len(prompt_ids) >= served.max_model_len:
            raise InvalidRequestError(
                f"the conversation has {len(prompt_ids)} tokens; this model's context is {served.max_model_len}",
                param="messages",
            )
        # The API's own bounds: any int64 seed folded into the engine's range, a server default max_tokens.
        raw = raw | {"seed": engine_seed(raw.get("seed"))}
        max_tokens = raw.get("max_tokens")
        if max_tokens is None or isinstance(max_tokens, int):
            raw["max_tokens"] = with_default_max_tokens(max_tokens, len(prompt_ids), served.max_model_len)
        params = sampling_params_from_dict({**raw, "stop": list(tokenizer.chat_stop_strings)})
        budget = prompt_budget(prompt_ids, params, served.max_model_len)
        job_id = f"chat-{uuid.uuid4().hex}"
        return make_job(
            job_id,
            served.name,
            prompt_ids,
            sampling_params_to_dict(params),
            tenant_id=self.tenant_id,
            adapter=job_adapter(adapter),
            token_budget=budget,
            reserved_tokens=reserved_tokens(limits, budget),
            chat_user_id=user_id,
        )

    async def _stream(self, run: JobRun, sent_at: float) -> None:
        first_token_at: float | None = None
        tokens = 0
        try:
            async for event in run.events():
                kind = event["type"]
                if kind == "delta":
                    if event["token_ids"] and first_token_at is None:
                        first_token_at = time.monotonic()
                    tokens += len(event["token_ids"])
                    await self.send_json(
                        {"type": "delta", "text": event["text"], "finish_reason": event["finish_reason"]}
                    )
                elif kind == "done":
                    await self.send_json(
                        {**event, "client": _client_timings(sent_at, first_token_at, tokens)}
                    )
                elif kind == "error":
                    await self._send_api_error(await run.fail(from_error_event(event, run.request_id)))
        except Exception as exc:  # the transport failed (Redis went away): tell the page, keep the socket
            await self._send_api_error(await run.fail(exc))
        finally:
            self.run = None

    async def _cancel_current(self) -> None:
        """Ask the worker to stop; the stream still ends with its "done" event (status cancelled)."""
        if self.run is not None:
            await self.run.cancel()

    async def _send_api_error(self, error: ApiError) -> None:
        await self._send_error(error.code or error.type, error.message, error.param)

    async def _send_unavailable(self) -> None:
        await self._send_error(
            "service_unavailable", "the inference service is unavailable; retry shortly", None
        )

    async def _send_error(self, code: str, message: str, param: str | None, **extra: Any) -> None:
        await self.send_json({"type": "error", "code": code, "message": message, "param": param, **extra})


def _requested_model(content: Any) -> str | None:
    """Return the model a chat message asks for (None: the served one); refuse anything but an object."""
    if not isinstance(content, dict):
        raise InvalidRequestError("send a JSON object with messages", param=None)
    model = content.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("model must be a string", param="model")
    return model or None


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(
            f"messages must be a list of 1 to {MAX_MESSAGES} messages", param="messages"
        )
    for message in messages:
        ok = (
            isinstance(message, dict)
            and message.get("role") in ROLES
            and isinstance(message.get("content"), str)
        )
        if not ok:
            raise InvalidRequestError(
                "each message needs a role (system, user, assistant) and text content", param="messages"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _client_timings(sent_at: float, first_token_at: float | None, tokens: int) -> dict[str, float | None]:
    """Timings as the web tier saw them: time to first token and decode speed."""
    end = time.monotonic()
    ttft = first_token_at - sent_at if first_token_at is not None else None
    rate = (
        (tokens - 1) / (end - first_token_at)
        if first_token_at is not None and tokens > 1 and end > first_token_at
        else None
    )
    return {"ttft_s": ttft, "tokens_per_s": rate, "tokens": tokens}


async def _signed_in_user(scope: dict[str, Any]) -> Any:
    """Return the user the socket's session still signs in, else AnonymousUser: get_user checks the user is
    active and the session's password hash; the session itself may have been deleted (signed out) since."""
    from django.contrib.auth.models import AnonymousUser

    session = scope["session"]
    if not await database_sync_to_async(session.exists)(session.session_key):
        return AnonymousUser()
    return await get_user(scope)


@database_sync_to_async
def _tenant(tenant_id: str, user: Any) -> Any:
    """Return the tenant `tenant_id` while it is active and the user a member of it, else None."""
    from accounts.models import Tenant

    return Tenant.objects.filter(pk=tenant_id, is_active=True, memberships__user_id=user.pk).first()


@database_sync_to_async
def _tenant_id_of(user: Any) -> str | None:
    """Return the id (as jobs carry it) of the user's first active tenant, or None if they have none."""
    from accounts.models import home_tenant

    tenant = home_tenant(user)
    return str(tenant.pk) if tenant else None
