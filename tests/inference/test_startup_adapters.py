"""The operator's start-up adapters through the web tier: the embedded engine started with RUVON_LORAS (a worker's
`--lora NAME=PATH`) serves "<base>:NAME" to every tenant through the official openai SDK, exactly as the engine
answers with that adapter; /v1/models, the chat picker and the websocket offer it; a tenant's own adapter of the
same name wins for that tenant; an unknown name stays a 404; over Redis the job still reaches the served model's
workers."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import redis
from asgiref.sync import async_to_sync
from django.core.wsgi import get_wsgi_application
from django.test import Client, override_settings

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.lora.request import LoRARequest
from gpu_worker.serving.redis_transport import RedisWorkerTransport
from gpu_worker.serving.worker import Worker
from inference.models import UsageRecord
from inference.transport import get_job_client, reset_job_client
from tests.conftest import E2E_REDIS_URL
from tests.inference.conftest import ready_adapter
from tests.inference.lora_files import peft_tensors, write_adapter
from tests.inference.test_websocket import HELLO, communicator, read_until, session_headers

if TYPE_CHECKING:
    from pytest_django.fixtures import SettingsWrapper

    from tests.conftest import ApiClient, Person

pytestmark = [pytest.mark.usefixtures("pirate", "media"), pytest.mark.django_db(transaction=True)]

PROMPT = [464, 5417, 318, 257, 1263]  # token ids: the answer does not depend on the tokenizer's round trip
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pirate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Serve random:tiny in-process as "tiny" with the start-up adapter "pirate" (RUVON_LORAS); return its
    folder. A strong random adapter, so its greedy answer differs from the base model's."""
    folder = write_adapter(
        tmp_path_factory.mktemp("startup") / "pirate", tensors=peft_tensors(std=1.0, seed=5)
    )
    tiny = {"RUVON_MODEL": "random:tiny", "RUVON_MODEL_NAME": "tiny", "RUVON_NUM_BLOCKS": 64}
    with override_settings(**tiny, RUVON_WARM_START=False, RUVON_LORAS=[f"pirate={folder}"]):
        reset_job_client()
        yield folder
        reset_job_client()


@pytest.fixture(scope="module")
def engine(pirate: Path) -> LLMEngine:
    """The engine the server embeds, built again on its own: what its answers must equal."""
    config = EngineConfig(model="random:tiny", num_blocks=64, enable_lora=True, loras=(f"pirate={pirate}",))
    return LLMEngine(config)


def engine_text(engine: LLMEngine, adapter: LoRARequest | None) -> str:
    """Return the engine's greedy answer to PROMPT with `adapter` (None: the base model)."""
    engine.add_request(f"ref-{uuid.uuid4().hex}", PROMPT, GREEDY, **({"adapter": adapter} if adapter else {}))
    return "".join(choice.text for output in engine.stream() for choice in output.outputs)


def sdk(person: Person) -> openai.OpenAI:
    """The official openai SDK, unchanged, on this process's Django (WSGI) with `person`'s key."""
    http = httpx.Client(transport=httpx.WSGITransport(app=get_wsgi_application()), timeout=60)
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=person.plaintext, http_client=http, max_retries=0
    )


def complete(person: Person, model: str) -> tuple[str, str]:
    """Return the text of `person`'s greedy completion of PROMPT on `model`, and its request id."""
    raw = sdk(person).completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    completion = raw.parse()
    assert completion.model == model
    return completion.choices[0].text, raw.headers["x-request-id"]


def usage_of(request_id: str) -> UsageRecord:
    get_job_client().settle()  # type: ignore[attr-defined]
    return UsageRecord.objects.get(request_id=request_id)


def test_it_answers_on_a_start_up_adapter_exactly_as_the_engine_does(
    owner: Person, engine: LLMEngine
) -> None:
    adapted, request_id = complete(owner, "tiny:pirate")
    base, _ = complete(owner, "tiny")
    assert adapted == engine_text(engine, engine.named_loras["pirate"])
    assert base == engine_text(engine, None) != adapted
    record = usage_of(request_id)
    assert (record.tenant, record.model, record.adapter, record.status) == (
        owner.key.tenant,
        "tiny",
        "pirate",
        "completed",
    )


def test_it_lists_the_start_up_adapter_for_every_tenant(owner: Person, outsider: Person) -> None:
    for person in (owner, outsider):
        models = sdk(person).models.list().data
        assert [(m.id, m.owned_by) for m in models] == [("tiny", "ruvon"), ("tiny:pirate", "system")]
        card = sdk(person).models.retrieve("tiny:pirate")
        assert (card.owned_by, card.model_extra["parent"]) == ("system", "tiny")
        assert "LoRA adapter pirate" in card.model_extra["label"]


def test_it_answers_an_unknown_start_up_name_with_404(owner: Person, as_owner: ApiClient) -> None:
    client = sdk(owner)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="tiny:nope", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "`tiny:nope` does not exist" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny:nope")
    response = as_owner.post("/v1/tokenize", {"model": "tiny:nope", "prompt": "Hi"})
    assert (response.status_code, response.json()["error"]["code"]) == (404, "model_not_found")
    assert not UsageRecord.objects.exists()


def test_it_tokenizes_on_a_start_up_adapter(as_outsider: ApiClient) -> None:
    tokens = as_outsider.post("/v1/tokenize", {"model": "tiny:pirate", "prompt": "Ahoy"}).json()["tokens"]
    assert tokens == as_outsider.post("/v1/tokenize", {"model": "tiny", "prompt": "Ahoy"}).json()["tokens"]
    response = as_outsider.post("/v1/detokenize", {"model": "tiny:pirate", "tokens": tokens})
    assert response.json()["prompt"] == "Ahoy"


def test_a_tenants_own_adapter_of_the_same_name_wins_for_that_tenant(
    owner: Person, outsider: Person, engine: LLMEngine
) -> None:
    own = ready_adapter(owner.key.tenant, owner.user, "pirate", tensors=peft_tensors(std=1.0, seed=11))
    theirs, request_id = complete(owner, "tiny:pirate")
    shared, _ = complete(outsider, "tiny:pirate")
    assert theirs == engine_text(engine, LoRARequest(own.engine_name, own.path, own.sha256))
    assert shared == engine_text(engine, engine.named_loras["pirate"]) != theirs
    assert [(m.id, m.owned_by) for m in sdk(owner).models.list().data] == [
        ("tiny", "ruvon"),
        ("tiny:pirate", "acme"),
    ]
    assert sdk(owner).models.retrieve("tiny:pirate").owned_by == "acme"
    assert sdk(outsider).models.retrieve("tiny:pirate").owned_by == "system"
    record = usage_of(request_id)
    assert (record.tenant, record.adapter) == (owner.key.tenant, "pirate")


def _picker(person: Person) -> list[tuple[str, str]]:
    client = Client()
    client.force_login(person.user)
    response = client.get("/chat/")
    assert response.status_code == 200
    return [(m["model"], m["label"]) for m in response.context["models"]][1:]


def test_the_chat_offers_and_serves_the_start_up_adapter(outsider: Person, owner: Person) -> None:
    ready_adapter(owner.key.tenant, owner.user, "mine")
    assert _picker(outsider) == [("tiny:pirate", "LoRA adapter pirate (start-up, for every tenant)")]
    assert _picker(owner) == [
        ("tiny:mine", "LoRA adapter mine (rank 4)"),
        ("tiny:pirate", "LoRA adapter pirate (start-up, for every tenant)"),
    ]

    headers = session_headers(outsider.user)

    async def chat() -> list[dict[str, Any]]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)  # ready
        await ws.send_json_to({"model": "tiny:pirate", "messages": HELLO, "params": {"max_tokens": 3}})
        messages = await read_until(ws, {"done", "error"})
        await ws.disconnect()
        return messages

    started, *_, done = async_to_sync(chat)()
    assert (started["type"], done["type"], done["adapter"]) == ("started", "done", "pirate")
    record = usage_of(started["request_id"])
    assert (record.tenant, record.model, record.adapter) == (outsider.key.tenant, "tiny", "pirate")


@pytest.fixture
def redis_served(settings: SettingsWrapper, pirate: Path) -> Iterator[str]:
    """Make the web tier talk over Redis to a worker thread serving random:tiny with `--lora pirate=...`
    under a name of its own; return that name."""
    connection = redis.Redis.from_url(E2E_REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {E2E_REDIS_URL}")
    name = f"tiny-startup-{uuid.uuid4().hex[:8]}"
    config = EngineConfig(model="random:tiny", num_blocks=64, enable_lora=True, loras=(f"pirate={pirate}",))
    transport = RedisWorkerTransport.from_url(E2E_REDIS_URL, name, usage_stream=f"ruvon:usage:{name}")
    worker = Worker(LLMEngine(config), transport, served_name=name, idle_wait_s=0.05, heartbeat_s=0.2)
    worker._maybe_heartbeat()  # announce before the first job, as the process does on start
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    reset_job_client()
    settings.REDIS_URL, settings.RUVON_MODEL_NAME = E2E_REDIS_URL, name
    yield name
    reset_job_client()
    worker.stop()
    thread.join(timeout=30)
    connection.delete(*connection.keys(f"ruvon:*{name}*"))


def test_over_redis_the_job_reaches_the_served_models_workers(
    redis_served: str, as_outsider: ApiClient, engine: LLMEngine
) -> None:
    ids = [card["id"] for card in as_outsider.get("/v1/models").json()["data"]]
    assert ids == [redis_served, f"{redis_served}:pirate"]
    body = {"model": f"{redis_served}:pirate", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = as_outsider.post("/v1/completions", body | {"ignore_eos": True})
    assert response.status_code == 200, response.content
    assert response.json()["choices"][0]["text"] == engine_text(engine, engine.named_loras["pirate"])
    missing = as_outsider.post("/v1/completions", body | {"model": f"{redis_served}:nope"})
    assert missing.status_code == 404
