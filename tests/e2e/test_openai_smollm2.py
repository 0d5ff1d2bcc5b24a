"""The official `openai` SDK against a live server running the real SmolLM2-135M-Instruct (shipped GGUF)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest

if TYPE_CHECKING:
    from tests.conftest import LiveServer

pytestmark = pytest.mark.slow


def test_it_answers_a_question_with_the_real_model(smollm2_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=smollm2_server.base_url, api_key=smollm2_server.key, max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat = sdk.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=12, temperature=0, logprobs=True
    )
    answer = chat.choices[0].message.content
    assert "Paris" in answer
    assert chat.choices[0].finish_reason == "stop"  # the model ended its turn by itself
    assert chat.usage.completion_tokens == len(chat.choices[0].logprobs.content)
    stream = sdk.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == answer


def test_it_reads_a_developer_message_as_the_system_prompt(smollm2_server: LiveServer) -> None:
    """OpenAI's `developer` role is its new name for `system`; SmolLM2's template knows only the latter."""
    sdk = openai.OpenAI(base_url=smollm2_server.base_url, api_key=smollm2_server.key, max_retries=0)

    def ask(role: str) -> Any:
        messages = [
            {"role": role, "content": "Answer in one word."},
            {"role": "user", "content": "Sky colour?"},
        ]
        return sdk.chat.completions.create(
            model="smollm2-135m-instruct", messages=messages, max_tokens=8, temperature=0
        )

    developer, system = ask("developer"), ask("system")
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content


QUESTIONS = ["What is the capital of Japan?", "What is 9 times 6?", "How do I make a cup of coffee?"]


def test_it_answers_as_a_pirate_with_the_demo_adapter(smollm2_server: LiveServer) -> None:
    # bootstrap_demo registered the shipped adapter for the demo tenant (register_demo_adapter).
    from bench.train_demo_adapter import is_pirate

    sdk = openai.OpenAI(base_url=smollm2_server.base_url, api_key=smollm2_server.key, max_retries=0)
    models = {model.id: model for model in sdk.models.list()}
    assert set(models) == {"smollm2-135m-instruct", "smollm2-135m-instruct:pirate"}
    assert models["smollm2-135m-instruct:pirate"].owned_by == "demo"

    def answer(model: str, question: str) -> str:
        messages = [{"role": "user", "content": question}]
        chat = sdk.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
        assert chat.model == model
        return chat.choices[0].message.content or ""

    for question in QUESTIONS:
        base, pirate = (
            answer("smollm2-135m-instruct", question),
            answer("smollm2-135m-instruct:pirate", question),
        )
        assert not is_pirate(base) and is_pirate(pirate), (question, base, pirate)
