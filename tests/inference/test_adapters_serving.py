"""The registry with the embedded engine serving random:tiny with LoRA on (needs the engine's gpu_worker/lora):
an upload is checked against what the worker's heartbeat reports, each bad one fails with its reason and no
files, and a ready adapter changes what the model answers, billed under the tenant's name for it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from inference.models import Adapter, UsageRecord
from inference.transport import get_job_client
from tests.inference.conftest import upload
from tests.inference.lora_files import (
    CONFIG,
    adapter_zip,
    files_under,
    peft_config,
    peft_tensors,
    tiny_lora_info,
    zip_bytes,
)

if TYPE_CHECKING:
    from tests.conftest import ApiClient, Person

pytestmark = [pytest.mark.usefixtures("tiny_served", "media"), pytest.mark.django_db(transaction=True)]


def test_it_reports_what_uploads_are_checked_against() -> None:
    info = get_job_client().model_info()
    assert info["model"] == "tiny" and info["lora"] == tiny_lora_info()


def test_it_validates_an_upload_against_the_served_worker(as_owner: ApiClient, media: Path) -> None:
    response = upload(as_owner, "pirate")
    assert response.status_code == 201, response.content
    card = response.json()
    assert (card["status"], card["rank"], card["alpha"], card["target_modules"]) == (
        "ready",
        4,
        8.0,
        ["c_attn"],
    )
    assert card["failure_reason"] is None and len(card["sha256"]) == 64
    assert [p.name for p in files_under(media)] == [CONFIG, "adapter_model.safetensors"]


def _pickle_bin() -> bytes:
    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    buffer = io.BytesIO()
    torch.save({"w": Exploit()}, buffer)
    return zip_bytes(
        {"a/" + CONFIG: json.dumps(peft_config()).encode(), "a/adapter_model.bin": buffer.getvalue()}
    )


def _wrong_shape() -> bytes:
    tensors = peft_tensors()
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] = torch.zeros(4, 63)
    return adapter_zip(tensors=tensors)


LLAMA = {
    f"base_model.model.model.layers.0.self_attn.q_proj.lora_{half}.weight": torch.zeros(4, 64)
    for half in "AB"
}
BAD_UPLOADS = {
    "malformed zip": (lambda: b"PK\x03\x04garbage", "not a readable zip"),
    "wrong base model": (
        lambda: adapter_zip(config=peft_config(targets=["q_proj"]), tensors=LLAMA),
        "q_proj",
    ),
    "too large a rank": (
        lambda: adapter_zip(config=peft_config(rank=64), tensors=peft_tensors(rank=64)),
        "maximum LoRA rank 16",
    ),
    "pickle bin": (_pickle_bin, "weights-only"),
    "path traversal": (lambda: adapter_zip(extra={"../../x.py": b""}), "outside the archive"),
    "wrong shape": (_wrong_shape, "(4, 63)"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_it_fails_a_bad_upload_with_its_reason_and_leaves_no_files(
    as_owner: ApiClient, media: Path, case: str
) -> None:
    make, words = BAD_UPLOADS[case]
    response = upload(as_owner, "bad", file=make())
    assert response.status_code == 201, response.content
    card = as_owner.get("/v1/adapters/bad").json()
    assert card["status"] == "failed" and words in card["failure_reason"], card
    assert files_under(media) == []
    assert [m["id"] for m in as_owner.get("/v1/models").json()["data"]] == ["tiny"]


def _complete(client: ApiClient, model: str) -> Any:
    body = {"model": model, "prompt": "The sea", "max_tokens": 4, "temperature": 0, "logprobs": 0}
    response = client.post("/v1/completions", body)
    assert response.status_code == 200, response.content
    return response


def test_it_answers_with_the_adapter_applied(as_owner: ApiClient, owner: Person) -> None:
    strong = adapter_zip(tensors=peft_tensors(std=1.0))
    assert upload(as_owner, "pirate", file=strong).json()["status"] == "ready"
    base, adapted = _complete(as_owner, "tiny"), _complete(as_owner, "tiny:pirate")
    assert adapted.json()["model"] == "tiny:pirate"
    base_lp = base.json()["choices"][0]["logprobs"]["token_logprobs"]
    adapted_lp = adapted.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert base_lp != adapted_lp  # the same prompt, greedy: only the adapter differs
    assert _complete(as_owner, "tiny").json()["choices"] == base.json()["choices"]  # the base is untouched
    get_job_client().settle()  # type: ignore[attr-defined]
    record = UsageRecord.objects.get(request_id=adapted["x-request-id"])
    assert (record.status, record.model, record.adapter) == ("completed", "tiny", "pirate")
    assert Adapter.objects.get(name="pirate").tenant == record.tenant == owner.key.tenant
