"""The API describes itself: an OpenAPI schema and interactive docs, served without a key."""

from __future__ import annotations

from django.test import Client

ENDPOINTS = {
    "/v1/completions": "post",
    "/v1/chat/completions": "post",
    "/v1/models": "get",
    "/v1/models/{model}": "get",
    "/v1/usage": "get",
    "/v1/tokenize": "post",
    "/v1/detokenize": "post",
}


def test_it_serves_the_openapi_schema(db: None) -> None:
    response = Client().get("/v1/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    for path, method in ENDPOINTS.items():
        operation = schema["paths"][path][method]
        assert operation["security"], f"{path} must require a key"
        assert "400" in operation["responses"] or method == "get"
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"]["scheme"] == "bearer"


def test_it_documents_the_openai_request_fields(db: None) -> None:
    schemas = Client().get("/v1/openapi.json").json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in [
        "messages",
        "n",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "stream",
    ]:
        assert field in chat
    completion = schemas["CompletionRequest"]["properties"]
    for field in ["prompt", "echo", "logprobs", "logit_bias", "stream_options", "top_k"]:
        assert field in completion


def test_it_serves_the_docs_page(db: None) -> None:
    response = Client().get("/v1/docs")
    assert response.status_code == 200
    assert b"openapi.json" in response.content
