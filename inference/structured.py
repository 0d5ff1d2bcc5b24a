"""Structured outputs and forced tool calls on the API: `response_format` and `tools` + `tool_choice` become
the JSON schema the engine decodes under (SamplingParams.json_schema), and a tool call's output becomes
OpenAI's `message.tool_calls`, whole or streamed."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gpu_worker.errors import InvalidRequestError
from gpu_worker.serving.protocol import Event
from gpu_worker.structured import check_json_schema
from inference.errors import from_error_event
from inference.rendering import ChatRenderer, Collected

ANY_OBJECT = {"type": "object"}  # json_object: any JSON object
NO_PARAMETERS = {"type": "object", "properties": {}}  # a function that declares no parameters


def _schema_text(schema: Any, param: str) -> str:
    """Return a schema as JSON text after checking a grammar can be built from it (400 otherwise)."""
    if not isinstance(schema, dict):
        raise InvalidRequestError("a JSON schema must be an object", param=param)
    text = json.dumps(schema, separators=(",", ":"))
    check_json_schema(text, param=param)
    return text


def response_format_schema(response_format: Any) -> str | None:
    """Return the schema a response_format asks for (None: free text), or raise InvalidRequestError."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return _schema_text(ANY_OBJECT, "response_format")
    if response_format.type != "json_schema":
        raise InvalidRequestError(
            f"response_format type {response_format.type!r} is not supported: use text, json_object or "
            "json_schema",
            param="response_format",
        )
    spec = response_format.json_schema
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidRequestError(
            'response_format json_schema needs {"name": ..., "schema": {...}}', param="response_format"
        )
    return _schema_text(spec.get("schema", {}), "response_format")


# ---------------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolPlan:
    """The tool call a request forces: one named function (the output is its arguments), or any one of
    several ("required": the output is {"name": ..., "arguments": {...}})."""

    schema: str
    names: tuple[str, ...]

    @property
    def named(self) -> str | None:
        """Return the function's name when only one can be called (its arguments then stream as they come)."""
        return self.names[0] if len(self.names) == 1 else None

    def call(self, text: str) -> dict[str, Any] | None:
        """Return the OpenAI tool call an output makes, or None if it is not complete JSON of the plan."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            return tool_call(self.named, text)
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        return tool_call(value["name"], json.dumps(value.get("arguments", {})))


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return {name: parameters schema} of the request's tools; raise InvalidRequestError on a bad entry."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequestError(
                f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name or name in functions:
            raise InvalidRequestError(f"tools[{i}].function.name must be a unique non-empty string", "tools")
        parameters = function.get("parameters", NO_PARAMETERS)
        _schema_text(parameters, "tools")
        functions[name] = parameters
    return functions


def _chosen(tool_choice: Any, functions: dict[str, dict[str, Any]]) -> list[str]:
    """Return the names a tool_choice lets the output call; raise InvalidRequestError for "auto" and bad ones."""
    if tool_choice == "required":
        return list(functions)
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or name not in functions:
            raise InvalidRequestError(
                'tool_choice must name one of the tools: {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        return [name]
    if tool_choice in (None, "auto"):
        raise InvalidRequestError(
            'tool_choice "auto" (the default with tools) needs a chat template that shows the model its tools '
            "and a parser of its own tool-call format; this model's template has no tools. Send tool_choice "
            '"required" or {"type": "function", "function": {"name": ...}} to make the model call a tool (its '
            'arguments are then decoded under the tool\'s parameters schema), or "none" to ignore the tools.',
            param="tool_choice",
        )
    raise InvalidRequestError(
        'tool_choice must be "none", "auto", "required" or a named function', "tool_choice"
    )


def tool_plan(tools: list[dict[str, Any]] | None, tool_choice: Any) -> ToolPlan | None:
    """Return the forced tool call of a request (None: tools absent or tool_choice "none")."""
    if tool_choice == "none" or (not tools and tool_choice is None):
        return None
    if not tools:
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    functions = _functions(tools)
    names = _chosen(tool_choice, functions)
    if len(names) == 1:
        return ToolPlan(_schema_text(functions[names[0]], "tools"), (names[0],))
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": functions[name]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    return ToolPlan(_schema_text({"anyOf": options}, "tools"), tuple(names))


def chat_constraint(body: Any) -> tuple[str | None, ToolPlan | None]:
    """Return (the JSON schema the output is decoded under, the forced tool call) of a chat request."""
    plan = tool_plan(body.tools, body.tool_choice)
    schema = response_format_schema(body.response_format)
    if plan is not None and schema is not None:
        raise InvalidRequestError(
            "a forced tool call and a JSON response_format cannot both shape the output", "response_format"
        )
    return (plan.schema if plan else schema), plan


# ------------------------------------------------------------------------------------------ rendering


class ToolCallRenderer(ChatRenderer):
    """Renders a forced tool call: each choice's output becomes message.tool_calls and finish_reason
    "tool_calls". A named function's arguments stream as they are decoded; with several tools the call is
    sent whole when the choice ends (its name is known only then). An output cut short (length) stays text."""

    def __init__(self, plan: ToolPlan, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan

    def response(self, result: Collected) -> dict[str, Any]:
        body = super().response(result)
        for choice in body["choices"]:
            call = self.plan.call(choice["message"]["content"]) if choice["finish_reason"] == "stop" else None
            if call is not None:
                choice["message"] |= {"content": None, "tool_calls": [call]}
                choice["finish_reason"] = "tool_calls"
        return body

    async def chunks(self, events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
        texts = [""] * self.n
        ids = [f"call_{secrets.token_hex(12)}" for _ in range(self.n)]
        async for event in events:
            kind = event["type"]
            if kind == "started":
                for index in range(self.n):
                    yield self._chunk(index, {"role": "assistant", "content": None})
            elif kind == "delta":
                index = event["index"]
                for delta in self._tool_deltas(ids[index], texts[index], event):
                    yield self._chunk(index, delta)
                texts[index] += event["text"]
                if event["finish_reason"]:
                    yield self._chunk(
                        index, {}, finish_reason=self._finish(texts[index], event["finish_reason"])
                    )
            elif kind == "error":
                raise from_error_event(event, self.request_id)
            elif kind == "done" and self.include_usage:
                yield self.usage_chunk(event)

    def _tool_deltas(self, call_id: str, before: str, event: Event) -> list[dict[str, Any]]:
        """Return the deltas one event of a choice sends: argument text for a named function (its header
        first), the whole call for a choice of several once it ends."""
        text, named = event["text"], self.plan.named
        if named is not None:
            head = {
                "index": 0,
                "id": call_id,
                "type": "function",
                "function": {"name": named, "arguments": ""},
            }
            deltas = [{"tool_calls": [head]}] if not before and (text or event["finish_reason"]) else []
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        if not event["finish_reason"]:
            return []
        call = self.plan.call(before + text) if event["finish_reason"] == "stop" else None
        if call is None:  # not a complete call: the text goes out as content
            return [{"content": before + text}]
        return [{"tool_calls": [{"index": 0, **call, "id": call_id}]}]

    def _finish(self, text: str, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.plan.call(text) is not None else reason
