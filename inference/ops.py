"""vLLM's operational endpoints at the root path: GET /health (readiness: 200 or 503 with the reason) and GET
/version, open to anyone, and POST /tokenize and /detokenize: the /v1 handlers themselves, with their auth."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import NinjaAPI
from ninja.responses import Status

from accounts.auth import api_key_auth
from inference import api as v1
from inference.errors import install_error_handlers
from inference.health import health_report, version_report
from inference.schemas import DetokenizeResponse, HealthReport, TokenizeResponse, VersionReport

ops = NinjaAPI(
    title="Ruvon operations",
    version="1",
    description="Health and version (no key needed); tokenize and detokenize as under /v1.",
    auth=api_key_auth,
    urls_namespace="ops",
    docs_url="/ops/docs",
    openapi_url="/ops/openapi.json",
)
install_error_handlers(ops)


@ops.get("/health", auth=None, response={200: HealthReport, 503: HealthReport}, tags=["operations"])
async def health(request: HttpRequest) -> Any:
    """200 when every served model has a live worker with it loaded and the database (and Redis) answer."""
    healthy, report = await health_report()
    return Status(200 if healthy else 503, report)


@ops.get("/version", auth=None, response=VersionReport, tags=["operations"])
async def version(request: HttpRequest) -> Any:
    """Ruvon's version and commit, and what the engine runs on."""
    return await version_report()


ops.post("/tokenize", response={200: TokenizeResponse, **v1.ERRORS}, tags=["tokens"])(v1.tokenize)
ops.post("/detokenize", response={200: DetokenizeResponse, **v1.ERRORS}, tags=["tokens"])(v1.detokenize)
