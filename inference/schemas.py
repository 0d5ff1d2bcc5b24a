"""Request and response schemas of the OpenAI-compatible API (django-ninja / pydantic), as the docs show them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from ninja import Field, Schema
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationInfo, field_validator

from gpu_worker.config import MAX_TOP_LOGPROBS

Stop = str | list[str] | None


class StreamOptions(Schema):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions. Beyond OpenAI's: vLLM's top_k, min_p, min_tokens,
    repetition_penalty, stop_token_ids, ignore_eos, include_stop_str_in_output, skip_special_tokens and
    cache_salt, and Ruvon's speculative (the openai SDK sends them with extra_body). Any other field is kept
    here (extra="allow") for services.check_fields to refuse, or to name in X-Ruvon-Ignored-Fields: a plain
    pydantic model, as ninja's Schema reads a body through a getter that drops the extra fields."""

    model_config = ConfigDict(extra="allow")

    model: str
    n: int | None = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off; else at most the vocabulary size.")
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Strict: 1.5 or "7" is a 400, not silently truncated. Any int64 is taken (services.engine_seed).
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Stop = Field(None, description="A string or a list of up to RUVON_MAX_STOP_SEQUENCES (16).")
    stop_token_ids: list[StrictInt] | None = Field(None, description="Token ids that end a choice, like EOS.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: StrictInt | None = Field(
        None, description="EOS, stop_token_ids and stop strings cannot end a choice before this many tokens."
    )
    repetition_penalty: float | None = Field(
        None, description="> 0; 1: off. Seen tokens' logits are divided by it if positive, else multiplied."
    )
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = Field(None, description="Default true: special tokens have no text.")
    # Ruvon extension (the openai SDK sends it with extra_body): false turns speculative decoding off for
    # this request.
    speculative: bool | None = None
    user: str | None = Field(None, max_length=256, description="Recorded on the request's usage record.")
    # vLLM's field: requests share cached prompt prefixes only with the same tenant *and* the same salt.
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


class ResponseFormat(BaseModel):  # not ninja's Schema: its own json_schema() would shadow the field
    type: str = Field(..., description="text, json_object or json_schema (inference/structured.py).")
    json_schema: dict[str, Any] | None = Field(
        None, description='With type json_schema: {"name": ..., "schema": {...}, "strict": true}.'
    )


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ...,
        description="A string or token ids; a list of strings or of token-id lists is a batch of prompts.",
    )
    max_tokens: int | None = Field(
        16, description="0 with echo: score the prompt (its logprobs), generate nothing."
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None


class TextPart(Schema):
    type: str
    text: str | None = None


class ChatMessage(Schema):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="An assistant's calls, as answered.")
    tool_call_id: str | None = Field(None, description="A tool message: the id of the call it answers.")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "required" or {"type": "function", "function": {"name": ...}}; not "auto".'
    )
    # vLLM's prefill (extra_body): continue_final_message (with add_generation_prompt false) continues the last,
    # assistant, message rather than opening a new turn.
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeRequest(Schema):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(Schema):
    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------------------------ responses


class PromptTokensDetails(Schema):
    cached_tokens: int


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Schema):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Schema):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class RuvonTimings(Schema):
    queued_s: float | None = Field(None, description="Submitted to first scheduled.")
    ttft_s: float | None = Field(None, description="Submitted to first token.")
    e2e_s: float | None = Field(None, description="Submitted to the end.")
    tpot_s: float | None = Field(None, description="Mean time per output token after the first.")
    tokens_per_s: float | None = Field(None, description="Decode speed after the first token.")
    device_s: float | None = Field(None, description="This request's share of the engine's step time.")
    draft_tokens: int = Field(0, description="Speculative decoding: draft tokens verified, all choices.")
    accepted_draft_tokens: int = Field(0, description="Of those, the drafts the target accepted.")


class RuvonExtension(Schema):
    """Ruvon's extension of OpenAI's response: how the request went and what it cost."""

    timings: RuvonTimings
    cost_usd: float = Field(..., description="device_s at the configured price of a GPU-hour")
    billed_usd: float = Field(..., description="What the request is billed by the price sheet")


class ResponseEnvelope(Schema):
    """The fields every completion and chat completion response carries around its choices."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    usage: Usage | None = None
    ruvon: RuvonExtension | None = None


class CompletionResponse(ResponseEnvelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(Schema):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Schema):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(Schema):
    name: str
    arguments: str = Field(..., description="JSON text, valid against the tool's parameters.")


class ToolCall(Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="With a forced tool_choice: the call made.")


class ChatChoice(Schema):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(ResponseEnvelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = Field(..., description="Null while no worker has reported (Redis mode).")
    label: str = Field(..., description="What the model is; says RANDOM for random weights.")
    parent: str | None = Field(None, description="For a LoRA adapter: the base model it applies to.")


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageRow(Schema):
    request_id: str
    model: str
    adapter: str | None = Field(None, description="The LoRA adapter it ran on; null: the base model.")
    api_key: str | None = Field(None, description="Prefix of the API key used.")
    user: str = Field("", description="The request's `user` field; empty when it sent none.")
    status: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    submitted_at: datetime
    started_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime | None = None


class UsageTotals(Schema):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int


class UsageList(Schema):
    object: Literal["list"] = "list"
    data: list[UsageRow]
    totals: UsageTotals
    has_more: bool


class UsageFilters(Schema):
    start: datetime | None = Field(None, description="Submitted at or after (ISO 8601; UTC unless it says).")
    end: datetime | None = Field(None, description="Submitted before (ISO 8601; UTC unless it says).")
    model: str | None = None
    adapter: str | None = Field(None, description='One of your adapters\' names; "" for the base model.')
    api_key: str | None = Field(None, description="Prefix of one of your API keys.")
    user: str | None = Field(None, description="Only requests that sent this `user`.")
    status: Literal["completed", "cancelled", "failed", "rejected"] | None = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=1_000_000_000)  # databases refuse offsets past 64 bits

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, moment: datetime | None) -> datetime | None:
        # A time without a zone is UTC (the records' own zone), never the server's local time; one with a zone
        # is moved to UTC here, where a moment past the calendar's ends (year 1 at +00:02) can still be a 400.
        if moment is None or moment.tzinfo is None:
            return None if moment is None else moment.replace(tzinfo=UTC)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ValueError("the time is out of the range of dates once in UTC") from None

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start")
        if start is not None and end is not None and end <= start:
            raise ValueError("end must be after start")
        return end


class TokenizeResponse(Schema):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeResponse(Schema):
    prompt: str


class AdapterCard(Schema):
    """A tenant's LoRA adapter, as /v1/adapters shows it; requests use it with `model` = its `model`."""

    id: str = Field(..., description="The adapter's name, unique within your tenant.")
    object: Literal["adapter"] = "adapter"
    model: str = Field(..., description='What a request sends as "model" to use it: "<base>:<name>".')
    base_model: str
    status: Literal["uploaded", "validating", "ready", "failed"]
    failure_reason: str | None = Field(None, description="Why validation failed (status failed).")
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str]
    size_bytes: int = Field(..., description="Bytes of the weights file (0 until validated).")
    sha256: str | None = Field(None, description="Of the weights file, once validated.")
    uploaded_by: str | None = None
    created_at: int
    updated_at: int


class AdapterList(Schema):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(Schema):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


# ------------------------------------------------------------------------------------ self-service


class KeyCreateRequest(Schema):
    """A new API key of your tenant: a name to recognise it by and optional per-key limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=100)
    max_requests_per_minute: StrictInt | None = Field(None, ge=1, le=1_000_000)
    max_tokens_per_minute: StrictInt | None = Field(None, ge=1, le=1_000_000_000)


class KeyCard(Schema):
    """An API key as its manager sees it: never its secret."""

    id: str = Field(..., description="The key's public prefix (the 12 hex characters after `rv_`).")
    object: Literal["api_key"] = "api_key"
    name: str
    redacted: str = Field(..., description="The key with its secret left out, as `rv_<prefix>_…`.")
    created_by: str | None = None
    created_at: int
    last_used_at: int | None = Field(None, description="Unix seconds, to the minute; null if never used.")
    revoked_at: int | None = None
    max_requests_per_minute: int | None = None
    max_tokens_per_minute: int | None = None


class NewKeyCard(KeyCard):
    key: str = Field(..., description="The whole key: shown in this answer only, never again.")


class KeyList(Schema):
    object: Literal["list"] = "list"
    data: list[KeyCard]


class KeyRevoked(Schema):
    id: str
    object: Literal["api_key"] = "api_key"
    revoked: bool


class MemberCard(Schema):
    username: str
    role: Literal["owner", "member"]
    joined_at: int


class TenantCard(Schema):
    """Your tenant: its members, this month's budget and what it has been billed so far."""

    id: str = Field(..., description="The tenant's slug.")
    object: Literal["tenant"] = "tenant"
    name: str
    role: Literal["owner", "member"] | None = Field(None, description="The role of the key's creator.")
    monthly_budget_usd: str | None = Field(None, description="Dollars per UTC calendar month; null: none.")
    month_spend_usd: str = Field(..., description="Billed since the start of this UTC month, in dollars.")
    month_start: int
    members: list[MemberCard]


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Schema):
    error: ErrorDetail


# --------------------------------------------------------------------------------------- operations


class HealthReport(Schema):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(
        ..., description='Each check ("model:<name>", "database", "redis"): "ok" or why not.'
    )
    reason: str | None = Field(None, description="What failed, when something did.")


class EngineVersions(Schema):
    ruvon: str
    torch: str
    cuda: str | None = None
    device: str
    model: str | None = None
    label: str | None = None


class VersionReport(Schema):
    version: str = Field(..., description="Ruvon's version.")
    commit: str | None = Field(
        None, description="The git commit (RUVON_COMMIT, else the checkout's), if known."
    )
    torch: str | None = Field(None, description="torch as installed beside the web tier.")
    engine: EngineVersions | None = Field(
        None, description="The engine's (embedded, or the newest worker's)."
    )
