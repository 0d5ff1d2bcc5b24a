"""The official `openai` SDK against a live server running the real SmolLM2-135M-Instruct (shipped GGUF)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
