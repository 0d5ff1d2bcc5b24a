"""Validating an upload against what a worker reports (gpu_worker.lora.format.check_adapter, for real): a good
adapter lands in its serving folder and is ready; every bad one fails with a clear reason and leaves no
extracted file behind; the LoRA info comes from a live worker's heartbeat, and no worker means wait."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from django.core.files.base import ContentFile

from accounts.models import Tenant
from gpu_worker.serving.redis_transport import RedisWorkerTransport
from inference.adapters import registry, validation
from inference.adapters.tasks import validate_adapter
from inference.models import Adapter
from inference.transport.redis_client import RedisJobClient
from tests.conftest import E2E_REDIS_URL
from tests.inference.conftest import ready_adapter, validated
from tests.inference.lora_files import (
    CONFIG,
    WEIGHTS,
    adapter_zip,
    files_under,
    peft_config,
    peft_tensors,
    safetensors_bytes,
    tiny_lora_info,
    zip_bytes,
)

pytestmark = [pytest.mark.usefixtures("media"), pytest.mark.django_db]


def _failed(adapter: Adapter, media: Path, *words: str) -> str:
    assert adapter.status == Adapter.Status.FAILED and adapter.path == ""
    assert all(word in adapter.failure_reason for word in words), adapter.failure_reason
    assert files_under(media) == [], "a failed validation must leave no extracted file"
    return adapter.failure_reason


def test_it_makes_a_good_adapter_ready_in_its_serving_folder(acme: Tenant, media: Path) -> None:
    tensors = peft_tensors(rank=8, targets=["c_attn", "mlp.c_proj"])
    adapter = validated(
        acme, adapter_zip(config=peft_config(rank=8, alpha=16, targets=["c_attn", "c_proj"]), tensors=tensors)
    )
    assert adapter.status == Adapter.Status.READY, adapter.failure_reason
    weights = safetensors_bytes(tensors)
    assert (adapter.rank, adapter.alpha, adapter.target_modules) == (8, 16.0, ["c_attn", "mlp.c_proj"])
    assert (adapter.sha256, adapter.size_bytes) == (hashlib.sha256(weights).hexdigest(), len(weights))
    folder = media / str(acme.pk) / f"pirate-{adapter.sha256[:12]}"
    assert Path(adapter.path) == folder.resolve() and Path(adapter.path).is_absolute()
    assert files_under(media) == [folder / CONFIG, folder / WEIGHTS]  # no staging left over
    assert (folder / WEIGHTS).read_bytes() == weights
    assert adapter.job_adapter() == {
        "name": f"{acme.pk}/pirate",
        "path": adapter.path,
        "sha256": adapter.sha256,
    }


def test_it_takes_a_weights_only_bin(acme: Tenant, media: Path) -> None:
    buffer = io.BytesIO()
    torch.save(peft_tensors(), buffer)
    data = zip_bytes(
        {"a/" + CONFIG: json.dumps(peft_config()).encode(), "a/adapter_model.bin": buffer.getvalue()}
    )
    adapter = validated(acme, data)
    assert adapter.status == Adapter.Status.READY, adapter.failure_reason
    assert [p.name for p in files_under(media)] == [CONFIG, "adapter_model.bin"]


class Exploit:
    """What a malicious pickle carries: a call the unpickler would make."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/ruvon-pwned",))


def test_it_refuses_a_pickle_bin_without_running_it(acme: Tenant, media: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": Exploit()}, buffer)
    raw = pickle.dumps({"w": Exploit()})
    for payload in (buffer.getvalue(), raw):
        data = zip_bytes({"a/" + CONFIG: json.dumps(peft_config()).encode(), "a/adapter_model.bin": payload})
        adapter = validated(acme, data)
        _failed(adapter, media, "adapter_model.bin", "weights-only")
        Adapter.objects.filter(pk=adapter.pk).delete()
    assert not Path("/tmp/ruvon-pwned").exists()


def test_it_refuses_a_malformed_zip(acme: Tenant, media: Path) -> None:
    _failed(validated(acme, b"PK\x03\x04 this is no zip"), media, "not a readable zip")


def test_it_refuses_a_path_traversal_zip(acme: Tenant, media: Path, tmp_path: Path) -> None:
    adapter = validated(acme, adapter_zip(extra={"../../../evil.py": b"import os"}))
    _failed(adapter, media, "outside the archive")
    assert not any(p.name == "evil.py" for p in files_under(tmp_path))


def test_it_refuses_an_adapter_for_another_base_model(acme: Tenant, media: Path) -> None:
    # A Llama adapter (q_proj, v_proj) uploaded for random:tiny, a GPT-2.
    llama = {
        f"base_model.model.model.layers.0.self_attn.{name}.lora_{half}.weight": torch.zeros(4, 64)
        for name in ("q_proj", "v_proj")
        for half in "AB"
    }
    adapter = validated(acme, adapter_zip(config=peft_config(targets=["q_proj", "v_proj"]), tensors=llama))
    _failed(adapter, media, "does not fit tiny", "q_proj", "not a projection of this model")


def test_it_refuses_a_rank_above_the_workers_maximum(acme: Tenant, media: Path) -> None:
    data = adapter_zip(config=peft_config(rank=32, alpha=32), tensors=peft_tensors(rank=32))
    _failed(validated(acme, data, tiny_lora_info(max_rank=16)), media, "rank 32", "maximum LoRA rank 16")


def test_it_refuses_a_tensor_of_the_wrong_shape(acme: Tenant, media: Path) -> None:
    tensors = peft_tensors()
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[key] = torch.zeros(191, 4)  # c_attn's output is 3 x 64
    _failed(validated(acme, adapter_zip(tensors=tensors)), media, key, "(191, 4)", "(192, 4)")


def test_it_keeps_a_failure_reason_short_whatever_the_upload_names(acme: Tenant, media: Path) -> None:
    # A 1 MiB tensor name compresses to almost nothing; quoted whole, a hundred such uploads made every
    # listing of the tenant's adapters (API, admin) 100 MiB, and the database row as big.
    tensors = {**peft_tensors(), "x" * (1 << 20): torch.zeros(1)}
    reason = _failed(
        validated(acme, adapter_zip(tensors=tensors)), media, "tensor 'xxx", "is not a LoRA A or B"
    )
    assert len(reason) <= 1003  # validation.MAX_REASON and the "..." of the elided middle


def test_it_refuses_a_layer_the_model_does_not_have(acme: Tenant, media: Path) -> None:
    _failed(validated(acme, adapter_zip(tensors=peft_tensors(layers=3))), media, "layer 2", "2 layers")


def test_it_fails_a_ready_adapter_that_no_longer_fits_and_removes_its_folder(
    acme: Tenant, media: Path
) -> None:
    adapter = ready_adapter(acme)
    assert files_under(media)
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    assert validation.check_and_publish(adapter, tiny_lora_info(max_rank=2)) == Adapter.Status.FAILED
    adapter.refresh_from_db()
    _failed(adapter, media, "rank 4")


def test_it_validates_the_same_upload_again_into_the_same_folder(acme: Tenant, media: Path) -> None:
    adapter = ready_adapter(acme)
    before = files_under(media)
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    assert validation.check_and_publish(adapter, tiny_lora_info()) == Adapter.Status.READY
    assert files_under(media) == before


def test_it_leaves_nothing_for_an_adapter_deleted_while_it_was_checked(acme: Tenant, media: Path) -> None:
    neighbour = ready_adapter(acme, name="first")
    archive = ContentFile(adapter_zip(tensors=peft_tensors(seed=5)), name="adapter.zip")
    doomed = registry.create_adapter(acme, None, "doomed", "tiny", archive, "tiny")
    Adapter.objects.filter(pk=doomed.pk).update(status=Adapter.Status.VALIDATING)
    staging, info = validation.stage_and_check(doomed, tiny_lora_info())
    Adapter.objects.filter(pk=doomed.pk).delete()  # the tenant deleted it meanwhile
    assert validation.publish(doomed, staging, info) == "gone"
    assert files_under(media) == files_under(Path(neighbour.path))


# ------------------------------------------------------------------------- where the LoRA info comes from


def test_it_removes_the_folder_of_an_adapter_deleted_as_it_became_ready(
    acme: Tenant, media: Path, django_capture_on_commit_callbacks: Any
) -> None:
    archive = ContentFile(adapter_zip(), name="adapter.zip")
    adapter = registry.create_adapter(acme, None, "pirate", "tiny", archive, "tiny")
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    seen = registry.adapter_of(acme, "pirate")  # DELETE /v1/adapters/pirate looks it up: validating, no path
    assert validation.check_and_publish(adapter, tiny_lora_info()) == Adapter.Status.READY  # then it is ready
    with django_capture_on_commit_callbacks(execute=True):
        registry.delete_adapter(seen)  # and deleted, with the path the API read
    assert not Adapter.objects.exists()
    assert files_under(media) == [], "a deleted adapter's serving folder must not stay on disk"


def test_it_refuses_a_base_model_that_is_not_served_or_has_lora_off() -> None:
    info = {"model": "tiny", "workers": 1, "lora": tiny_lora_info()}
    assert validation.lora_support("tiny", info) == tiny_lora_info()
    with pytest.raises(validation.AdapterRefused, match="'gpt2' is not served here"):
        validation.lora_support("gpt2", info)
    with pytest.raises(validation.AdapterRefused, match="without LoRA .*--enable-lora"):
        validation.lora_support("tiny", info | {"lora": None})
    with pytest.raises(validation.WorkerUnavailable, match="no worker of 'tiny' is running"):
        validation.lora_support("tiny", info | {"workers": 0, "lora": None})


@pytest.fixture
def redis_url() -> str:
    connection = redis.Redis.from_url(E2E_REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {E2E_REDIS_URL}")
    connection.delete(*connection.keys("ruvon:*lora-test*") or ["ruvon:none"])
    return E2E_REDIS_URL


def test_it_reads_the_lora_info_from_a_live_workers_heartbeat(redis_url: str) -> None:
    model = f"lora-test-{os.getpid()}"
    client = RedisJobClient(redis_url, model)
    with pytest.raises(validation.WorkerUnavailable):
        validation.lora_support(model, client.model_info())  # no worker yet: wait, do not fail
    worker = RedisWorkerTransport.from_url(redis_url, model)
    worker.heartbeat({"model": model, "time": time.time(), "lora": tiny_lora_info(8)}, [])
    assert validation.lora_support(model, client.model_info()) == tiny_lora_info(8)
    worker.heartbeat({"model": model, "time": time.time(), "lora": None}, [])  # restarted without LoRA
    with pytest.raises(validation.AdapterRefused, match="without LoRA"):
        validation.lora_support(model, client.model_info())
    worker.close()
    client.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("tiny_served")
def test_it_fails_an_upload_when_the_embedded_engine_cannot_check_it(acme: Tenant, media: Path) -> None:
    # The task's own path: the embedded engine serves "tiny", so another base model has no worker to ask.
    adapter = validated(acme, adapter_zip())
    Adapter.objects.filter(pk=adapter.pk).update(base_model="gpt2")
    assert validate_adapter.delay(adapter.pk).get() == Adapter.Status.FAILED
    adapter.refresh_from_db()
    _failed(adapter, media, "'gpt2' is not served here")
    assert validate_adapter.delay(adapter.pk + 1000).get() == "gone"


def test_it_fails_an_adapter_whose_archive_left_storage(acme: Tenant, media: Path) -> None:
    adapter = ready_adapter(acme)
    Path(adapter.archive.path).unlink()
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    assert validation.check_and_publish(adapter, tiny_lora_info()) == Adapter.Status.FAILED
    adapter.refresh_from_db()
    _failed(adapter, media, "no longer in storage")
