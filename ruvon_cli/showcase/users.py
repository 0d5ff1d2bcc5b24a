"""Simulated users of the showcase: each one streams chat completions through the official openai SDK, one
after another, and times what it sees (TTFT, the gaps between chunks, the end) beside what the response's
usage chunk says (tokens, the `ruvon` extension's cost, price and draft counts)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import openai

QUESTIONS = (
    "What is the capital of France?",
    "Name three planets of the solar system.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
    "What do bees make?",
    "How many legs does a spider have?",
    "Suggest a name for a small boat.",
)


@dataclass
class RequestRecord:
    """One request as its user saw it; times in seconds from the request's own send."""

    user: int
    index: int  # the request's number within its user's session
    model: str
    request_id: str | None = None
    sent_at: float = 0.0  # seconds since the run's start
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # the response's own figures (inference/billing.py response_extension)
    billed_usd: float = 0.0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # each terminal chunk's reason, in order
    text: str = ""
    error: str | None = None


@dataclass(frozen=True)
class UserPlan:
    """Who the simulated users are: how many, how many requests each, and which model each asks for."""

    users: int
    requests_per_user: int
    max_tokens: int
    models: tuple[str, ...]  # user i asks for models[i % len(models)]

    def model_of(self, user: int) -> str:
        return self.models[user % len(self.models)]


class Load:
    """The records of one run, filled as the streams arrive (the live view reads them while it runs)."""

    def __init__(self, plan: UserPlan) -> None:
        self.plan = plan
        self.records: list[RequestRecord] = []
        self.start = time.perf_counter()

    async def run(self, url: str, key: str) -> list[RequestRecord]:
        """Run every user to the end of its session; return every request's record."""
        async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600) as client:
            self.start = time.perf_counter()
            await asyncio.gather(*(self._user(client, u) for u in range(self.plan.users)))
        return self.records

    async def _user(self, client: openai.AsyncOpenAI, user: int) -> None:
        for index in range(self.plan.requests_per_user):
            record = RequestRecord(user, index, self.plan.model_of(user))
            self.records.append(record)
            question = QUESTIONS[(user * self.plan.requests_per_user + index) % len(QUESTIONS)]
            await self._request(client, record, question)

    async def _request(self, client: openai.AsyncOpenAI, record: RequestRecord, question: str) -> None:
        sent = time.perf_counter()
        record.sent_at, last = sent - self.start, sent
        try:
            stream = await client.chat.completions.create(
                model=record.model, messages=[{"role": "user", "content": question}], stream=True,
                max_tokens=self.plan.max_tokens, temperature=0.0, stream_options={"include_usage": True},
                user=f"showcase-user-{record.user}",
            )  # fmt: skip
            async for chunk in stream:
                now = time.perf_counter()
                record.request_id = "req_" + chunk.id.removeprefix("chatcmpl-")
                if chunk.choices and chunk.choices[0].delta.content:
                    if record.ttft_s is None:
                        record.ttft_s = now - sent
                    else:
                        record.gaps_s.append(now - last)
                    last = now
                    record.text += chunk.choices[0].delta.content
                if chunk.choices and chunk.choices[0].finish_reason:
                    record.finish_reasons.append(chunk.choices[0].finish_reason)
                if chunk.usage is not None:
                    read_usage(record, chunk.usage, chunk.model_extra or {})
        except openai.OpenAIError as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.e2e_s = time.perf_counter() - sent


def read_usage(record: RequestRecord, usage: Any, extra: dict[str, Any]) -> None:
    """Fill the record from the usage chunk: the token counts and the `ruvon` extension's cost and drafts."""
    record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    extension = extra.get("ruvon") or {}
    record.cost_usd = float(extension.get("cost_usd") or 0.0)
    record.billed_usd = float(extension.get("billed_usd") or 0.0)
    timings = extension.get("timings") or {}
    record.draft_tokens = int(timings.get("draft_tokens") or 0)
    record.accepted_draft_tokens = int(timings.get("accepted_draft_tokens") or 0)
