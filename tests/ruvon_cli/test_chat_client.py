"""`ruvon chat` against a live Ruvon server (daphne, embedded random:tiny): one-shot and REPL modes stream
replies and print timings; bad keys and unreachable servers fail with a clear message."""

from __future__ import annotations

import argparse
import io

import pytest

from ruvon_cli.chat_client import ChatClient, ChatSession, add_chat_parser, run_chat
from tests.live_server import LiveServer, shared_live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> LiveServer:
    return shared_live_server()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ruvon")
    add_chat_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["chat", *argv])


def test_it_answers_a_one_shot_prompt_with_timings(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(
        "-p", "Say hi", "--base-url", f"{server.url}/v1", "--api-key", server.api_key, "--max-tokens", "5"
    )
    assert run_chat(args) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "TTFT" in err and "tokens/s" in err and "tokens" in err


def test_it_keeps_the_conversation_in_the_repl_until_reset(server: LiveServer) -> None:
    with ChatClient(f"{server.url}/v1", server.api_key) as client:
        assert client.models() == ["tiny"]
        session = ChatSession(
            client, "tiny", {"max_tokens": 3, "temperature": 0}, system="Be brief.", quiet=True
        )
        status = session.repl(io.StringIO("first\nsecond\n"))
        roles = [m["role"] for m in session.messages]
        assert status == 0 and roles == ["system", "user", "assistant", "user", "assistant"]
        session.repl(io.StringIO("/reset\n/exit\nnever sent\n"))
        assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_it_reports_the_servers_error_for_a_bad_key(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("-p", "hi", "--base-url", f"{server.url}/v1", "--api-key", "rv_bogus_key")
    assert run_chat(args) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_it_reports_a_bad_request_and_the_repl_goes_on(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with ChatClient(f"{server.url}/v1", server.api_key) as client:
        session = ChatSession(client, "tiny", {"max_tokens": 100_000}, system=None, quiet=True)
        assert session.repl(io.StringIO("too long a reply\n")) == 0
    assert "HTTP 400" in capsys.readouterr().err and session.messages == []


def test_it_needs_an_api_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("RUVON_API_KEY", raising=False)
    assert run_chat(parse("-p", "hi")) == 2
    assert "RUVON_API_KEY" in capsys.readouterr().err


def test_it_says_when_the_server_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("-p", "hi", "--base-url", "http://127.0.0.1:9/v1", "--api-key", "k")
    assert run_chat(args) == 1
    assert "cannot reach" in capsys.readouterr().err
