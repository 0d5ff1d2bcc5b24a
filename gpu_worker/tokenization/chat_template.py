"""Chat templates: checks a conversation and renders it to a prompt with the model's Jinja2 template, in a
sandbox (templates come with downloaded models and are untrusted code), or with a plain one for GPT-2."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gpu_worker.errors import InvalidRequestError, ModelLoadError

ROLES = ("system", "developer", "user", "assistant", "tool")

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The template for models that ship none (GPT-2): one "Role: content" line per message, then "Assistant:".

    System: You are terse.
    User: Hi!
    Assistant:

A base model continues such a transcript by writing the assistant's line, and then, left alone, the next
"User:" line too; PLAIN_CHAT_STOP is there to cut it off.
"""

PLAIN_CHAT_STOP = ("\nUser:", "\nSystem:")


def _raise_exception(message: str) -> NoReturn:
    """Let a template reject a conversation it cannot render (many check role order this way)."""
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own tojson escapes HTML characters; a prompt wants them as they are.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks/lstrip_blocks and loop controls are what templates on the Hub are written against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Return the messages if each has a known role and string content; else raise InvalidRequestError."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content'", param="messages"
            )
        if message.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {message.get('role')!r}",
                param="messages",
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
    return messages


class ChatTemplate:
    """One compiled chat template and the special-token strings it may refer to."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source if source is not None else PLAIN_CHAT_TEMPLATE
        self.is_plain = source is None
        # Stop strings a caller should add for this format: only the plain one lacks an end-of-turn token.
        self.stop_strings: tuple[str, ...] = PLAIN_CHAT_STOP if self.is_plain else ()
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Return the prompt for a conversation; raise InvalidRequestError if the template rejects it."""
        validate_messages(messages)
        # OpenAI's developer role is its new name for system, the only one templates know.
        messages = [m | {"role": "system"} if m["role"] == "developer" else m for m in messages]
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except (jinja2.TemplateError, TypeError) as exc:
            raise InvalidRequestError(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from exc
