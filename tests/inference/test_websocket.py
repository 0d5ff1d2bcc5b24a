"""The chat websocket through the real ASGI application (session auth, origin check, consumer) with the
embedded random:tiny engine: streaming, refusals, bad input, stop and disconnect both cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from accounts import limits
from accounts.limits import MemoryBuckets, admit, chat_limits
from accounts.models import Membership, Tenant
from inference.models import UsageRecord
from inference.transport import get_job_client, reset_job_client

pytestmark = [pytest.mark.usefixtures("tiny_served"), pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(autouse=True)
def usage_written() -> Iterator[None]:
    """After each test, wait until the embedded client has written every usage record it was handed, so no
    write races the database flush between tests."""
    yield
    usage = getattr(get_job_client(), "usage", None)
    if usage is not None:
        usage.join()


def session_headers(user: Any, client: Client | None = None) -> list[tuple[bytes, bytes]]:
    """Return a websocket's headers with the session of `user` signed in on `client` (default: a new one)."""
    client = client or Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [(b"cookie", cookie.encode()), (b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]


def communicator(headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    from ruvon.asgi import application

    return WebsocketCommunicator(application, "/ws/chat/", headers=headers)


async def read_until(ws: WebsocketCommunicator, kinds: set[str], timeout: float = 30) -> list[dict[str, Any]]:
    """Return the messages received up to and including the first whose type is in `kinds`."""
    messages = []
    while True:
        message = await ws.receive_json_from(timeout=timeout)
        messages.append(message)
        if message["type"] in kinds:
            return messages


def usage_record(request_id: str) -> UsageRecord:
    """Return a request's usage record. The worker hands it to the writer before the terminal event, so
    waiting for the writer is enough (and on SQLite, reading while it writes would hit a table lock)."""
    get_job_client().usage.join()  # type: ignore[attr-defined]
    return UsageRecord.objects.get(request_id=request_id)


def wait_for(condition: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def test_it_streams_a_chat_to_a_member_and_records_usage(owner: Any) -> None:
    headers = session_headers(owner.user)

    async def scenario() -> list[dict[str, Any]]:
        ws = communicator(headers)
        connected, _ = await ws.connect(timeout=30)
        assert connected
        ready = await ws.receive_json_from(timeout=30)
        assert ready["type"] == "ready" and ready["model"]["model"] == "tiny"
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 5, "temperature": 0}})
        messages = await read_until(ws, {"done", "error"})
        await ws.disconnect()
        return messages

    messages = async_to_sync(scenario)()
    started, *deltas, done = messages
    assert started["type"] == "started" and all(m["type"] == "delta" for m in deltas)
    assert (done["type"], done["status"]) == ("done", "completed")
    assert 1 <= done["usage"]["completion_tokens"] <= 5 and done["client"]["ttft_s"] > 0
    record = usage_record(started["request_id"])
    assert record.tenant == owner.key.tenant and record.status == "completed"


def test_it_refuses_a_chat_over_the_tenant_budget(owner: Any) -> None:
    tenant = owner.key.tenant
    tenant.monthly_budget_usd = 0
    tenant.save(update_fields=["monthly_budget_usd"])
    headers = session_headers(owner.user)

    async def scenario() -> dict[str, Any]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)  # ready
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 5}})
        [error] = await read_until(ws, {"error", "started"})
        await ws.disconnect()
        return error

    error = async_to_sync(scenario)()
    assert error["type"] == "error" and error["code"] == "insufficient_quota"
    assert not UsageRecord.objects.filter(tenant=tenant).exists()


@pytest.fixture
def frozen_buckets(monkeypatch: pytest.MonkeyPatch) -> MemoryBuckets:
    """Rate-limit buckets whose clock stands still: none refills while a test runs, however slow the box."""
    buckets = MemoryBuckets(clock=lambda: 1_000_000.0)
    monkeypatch.setattr(limits, "get_buckets", lambda: buckets)
    return buckets


async def chats(headers: list[tuple[bytes, bytes]], count: int) -> list[dict[str, Any]]:
    """Open a chat socket, send `count` chats one after another; return how each ended (done or error)."""
    ws = communicator(headers)
    await ws.connect(timeout=30)
    await ws.receive_json_from(timeout=30)  # ready
    endings = []
    for _ in range(count):
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 2}})
        endings.append((await read_until(ws, {"done", "error"}))[-1])
    await ws.disconnect()
    return endings


@pytest.mark.usefixtures("frozen_buckets")
def test_it_refuses_a_chat_over_the_users_requests_per_minute(
    owner: Any, teammate: Any, settings: Any
) -> None:
    settings.RUVON_CHAT_RPM = 2
    tenant = owner.key.tenant
    owner_headers, teammate_headers = session_headers(owner.user), session_headers(teammate.user)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        first = await chats(owner_headers, 3)
        another_socket = await chats(owner_headers, 1)  # more sockets buy no more requests
        return first, another_socket, await chats(teammate_headers, 2)

    first, another_socket, teammates = async_to_sync(scenario)()
    assert [e["type"] for e in first] == ["done", "done", "error"]
    refused = [first[2], another_socket[0]]
    for error in refused:
        assert error["code"] == "rate_limit_exceeded" and error["param"] is None
        assert "requests per minute (limit 2)" in error["message"] and "Retry in" in error["message"]
        assert error["retry_after"] == 30  # a request's worth of a 2-per-minute bucket
    assert [e["type"] for e in teammates] == ["done", "done"]  # each member has buckets of their own
    get_job_client().usage.join()  # type: ignore[attr-defined]
    assert UsageRecord.objects.filter(tenant=tenant).count() == 4  # the refused ones ran nowhere


def test_it_settles_a_chats_tokens_to_what_it_used(
    owner: Any, settings: Any, frozen_buckets: MemoryBuckets, stepped: Any
) -> None:
    settings.RUVON_CHAT_RPM, settings.RUVON_CHAT_TPM = 0, 10_000
    headers = session_headers(owner.user)
    caller = chat_limits(owner.key.tenant.pk, owner.user.pk)

    async def tokens_left() -> int:
        return int((await admit(caller, 0))["x-ratelimit-remaining-tokens"])

    async def scenario() -> tuple[str, int]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 100}})
        started = await ws.receive_json_from(timeout=10)
        in_flight = await tokens_left()  # the estimate is drawn: prompt plus 100
        await asyncio.to_thread(stepped.worker.run_once)
        await read_until(ws, {"delta"})
        await ws.disconnect()  # the browser goes away: the worker ends it cancelled, its usage settles
        await asyncio.to_thread(stepped.worker.run_once)
        return started["request_id"], in_flight

    rid, in_flight = async_to_sync(scenario)()
    record = usage_record(rid)
    assert record.status == "cancelled" and record.completion_tokens < 100
    assert in_flight == 10_000 - record.prompt_tokens - 100
    assert async_to_sync(tokens_left)() == 10_000 - record.total_tokens


async def chat_after(
    headers: list[tuple[bytes, bytes]], change: Callable[[], Awaitable[None]]
) -> tuple[list[dict[str, Any]], Any]:
    """Open a chat socket (ready: the user may chat), make `change`, send a chat; return the replies up to
    an error or a start, and what the socket received next."""
    ws = communicator(headers)
    await ws.connect(timeout=30)
    await ws.receive_json_from(timeout=30)
    await change()
    await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 5}})
    replies = await read_until(ws, {"error", "started"})
    closed = await ws.receive_output(timeout=10)
    await ws.disconnect()
    return replies, closed


@pytest.mark.parametrize("loses_access", ["tenant deactivated", "membership removed"])
def test_it_stops_serving_an_open_chat_once_its_user_loses_the_tenant(owner: Any, loses_access: str) -> None:
    tenant = owner.key.tenant
    headers = session_headers(owner.user)

    async def lose_access() -> None:
        if loses_access == "tenant deactivated":
            await Tenant.objects.filter(pk=tenant.pk).aupdate(is_active=False)
        else:
            await Membership.objects.filter(tenant=tenant, user=owner.user).adelete()

    [error], closed = async_to_sync(chat_after)(headers, lose_access)
    assert error["type"] == "error" and error["code"] == "permission_denied"
    assert closed == {"type": "websocket.close", "code": 4403}
    assert not UsageRecord.objects.filter(tenant=tenant).exists()


@pytest.mark.parametrize("ends", ["signed out", "password changed", "user deactivated"])
def test_it_stops_serving_an_open_chat_once_its_session_no_longer_signs_the_user_in(
    owner: Any, ends: str
) -> None:
    browser = Client()
    headers = session_headers(owner.user, browser)

    async def end_session() -> None:
        user = await get_user_model().objects.aget(pk=owner.user.pk)
        if ends == "signed out":  # in another tab: the session is gone
            assert (await sync_to_async(browser.post)("/accounts/logout/")).status_code == 302
        elif ends == "password changed":  # Django signs out every other session of the user
            user.set_password("pw-changed")
            await user.asave()
        else:
            user.is_active = False
            await user.asave()

    [error], closed = async_to_sync(chat_after)(headers, end_session)
    assert error["type"] == "error" and error["code"] == "permission_denied"
    assert closed == {"type": "websocket.close", "code": 4401}
    assert not UsageRecord.objects.filter(tenant=owner.key.tenant).exists()


def test_it_refuses_an_anonymous_websocket() -> None:
    async def scenario() -> bool:
        connected, _ = await communicator([(b"origin", b"http://127.0.0.1")]).connect(timeout=10)
        return connected

    assert async_to_sync(scenario)() is False


def test_it_refuses_a_user_outside_every_tenant() -> None:
    headers = session_headers(get_user_model().objects.create_user("loner", password="pw-loner"))

    async def scenario() -> tuple[bool, Any]:
        return await communicator(headers).connect(timeout=10)

    assert async_to_sync(scenario)() == (False, 4403)


def test_it_reports_bad_input_and_keeps_the_socket_open(owner: Any) -> None:
    headers = session_headers(owner.user)

    async def scenario() -> list[dict[str, Any]]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)
        replies = []
        for bad in (
            {"messages": []},
            {"messages": HELLO, "params": {"top_k": 3}},
            {"messages": [{"role": "x"}]},
        ):
            await ws.send_json_to(bad)
            replies.append(await ws.receive_json_from(timeout=10))
        await ws.send_to(text_data="{not json")
        replies.append(await ws.receive_json_from(timeout=10))
        await ws.send_to(text_data="[" * 100_000 + "]" * 100_000)  # deeper than the JSON parser recurses
        replies.append(await ws.receive_json_from(timeout=10))
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 2}})
        replies.append((await read_until(ws, {"done", "error"}))[-1])
        await ws.disconnect()
        return replies

    *errors, done = async_to_sync(scenario)()
    assert [(e["type"], e["param"]) for e in errors] == [
        ("error", "messages"),
        ("error", "params"),
        ("error", "messages"),
        ("error", None),
        ("error", None),
    ]
    assert done["status"] == "completed"


@pytest.fixture
def stepped() -> Iterator[Any]:
    """The embedded client with its engine thread stopped: the test steps the worker itself, so a cancel
    lands mid-generation however fast or slow the machine is. A fresh client replaces it afterwards."""
    client = get_job_client()
    client.worker.stop()  # type: ignore[attr-defined]
    client._thread.join(timeout=30)  # type: ignore[attr-defined]
    yield client
    reset_job_client()


def test_it_stops_a_reply_when_asked(owner: Any, stepped: Any) -> None:
    headers = session_headers(owner.user)

    async def scenario() -> list[dict[str, Any]]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 100}})
        messages = [await ws.receive_json_from(timeout=10)]
        rid = messages[0]["request_id"]
        await asyncio.to_thread(stepped.worker.run_once)
        messages += await read_until(ws, {"delta"})
        await ws.send_json_to({"type": "cancel"})
        while not stepped.transport.cancel_requested([rid]):  # the consumer has passed the cancel on
            await asyncio.sleep(0.01)
        await asyncio.to_thread(stepped.worker.run_once)
        messages += await read_until(ws, {"done", "error"})
        await ws.disconnect()
        return messages

    messages = async_to_sync(scenario)()
    assert [m["type"] for m in messages] == ["started", "delta", "delta", "done"]
    assert messages[-1]["status"] == "cancelled" and messages[-1]["usage"]["completion_tokens"] == 1
    rid = messages[0]["request_id"]
    assert usage_record(rid).status == "cancelled"


def test_it_cancels_the_reply_when_the_browser_goes_away(owner: Any, stepped: Any) -> None:
    headers = session_headers(owner.user)

    async def scenario() -> str:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)
        await ws.send_json_to({"messages": HELLO, "params": {"max_tokens": 100}})
        started = await ws.receive_json_from(timeout=10)
        await asyncio.to_thread(stepped.worker.run_once)
        await read_until(ws, {"delta"})
        await ws.disconnect()
        await asyncio.to_thread(stepped.worker.run_once)
        return started["request_id"]

    rid = async_to_sync(scenario)()
    record = usage_record(rid)
    assert (record.status, record.completion_tokens) == ("cancelled", 1)
    stats = stepped.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_it_renders_the_chat_page_for_a_member_only(owner: Any) -> None:
    anonymous = Client().get("/chat/")
    assert anonymous.status_code == 302 and "login" in anonymous["Location"]
    member = Client()
    member.force_login(owner.user)
    page = member.get("/chat/")
    assert page.status_code == 200
    assert b"inference/chat.js" in page.content and b"tiny" in page.content


@pytest.mark.slow
def test_it_streams_a_chat_to_a_real_websocket_client_of_a_live_server() -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from tests.live_server import shared_live_server

    server = shared_live_server()
    url = f"ws://{server.host}/ws/chat/"
    origin = {"Origin": server.url}
    with pytest.raises(InvalidStatus):  # anonymous: the handshake is refused
        connect(url, additional_headers=origin, open_timeout=30).close()
    with connect(url, additional_headers={**origin, "Cookie": server.login_cookie()}, open_timeout=30) as ws:
        ready = json.loads(ws.recv(timeout=30))
        ws.send(json.dumps({"messages": HELLO, "params": {"max_tokens": 6, "temperature": 0}}))
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(json.loads(ws.recv(timeout=30)))
    assert ready["model"]["model"] == "tiny" and "RANDOM" in ready["model"]["label"]
    started, done = messages[0], messages[-1]
    assert (done["type"], done["status"]) == ("done", "completed")
    assert any(m["type"] == "delta" for m in messages)
    assert wait_for(lambda: server.usage_statuses().get(started["request_id"])) == "completed"
