"""Every error the API can return, mapped in one place to an HTTP status and an OpenAI error object."""

from __future__ import annotations

import logging
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import OperationalError
from django.http import Http404, HttpRequest, JsonResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from accounts.auth import ApiKeyRejected
from accounts.limits import QuotaExceeded, RateLimited
from gpu_worker.errors import CapacityError, InvalidRequestError, ModelLoadError
from inference.transport import ModelLoading

logger = logging.getLogger(__name__)

# OpenAI's error "type" for each status the API uses.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
RETRY_AFTER_S = {429: 1, 503: 1}
MODEL_LOADING_RETRY_S = 2


class ApiError(Exception):
    """An error already shaped for the API: HTTP status, message, and the OpenAI `param`/`code` fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.error_type = error_type
        self.headers = dict(headers or {})
        retry_after = retry_after if retry_after is not None else RETRY_AFTER_S.get(status)
        if retry_after is not None and "x-should-retry" not in self.headers:
            self.headers["Retry-After"] = str(retry_after)

    @property
    def type(self) -> str:
        if self.error_type is not None:
            return self.error_type
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ModelNotFound(ApiError):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            status=404,
            code="model_not_found",
            param="model",
        )


# Worker error codes whose message may carry exception text: the client gets a generic one instead.
INTERNAL_CODES = frozenset({"internal_error", "engine_error"})


def internal_error(request_id: str | None) -> ApiError:
    """Return the generic 500 a client gets for a bug: no internals, the request id to quote."""
    suffix = f" (request id {request_id})" if request_id else ""
    return ApiError(
        f"The server had an error while processing your request{suffix}.", status=500, code="internal_error"
    )


def from_error_event(event: dict[str, Any], request_id: str | None = None) -> ApiError:
    """Return the ApiError for a worker's terminal error event; internal failures are logged, not shown."""
    status = int(event.get("http_status") or 500)
    code = event.get("code")
    if status >= 500 and code in INTERNAL_CODES:
        logger.error("request %s failed in the worker: %s", request_id, event.get("message"))
        error = internal_error(request_id)
        error.code = code
        return error
    return ApiError(
        str(event.get("message") or "the request failed"), status=status, code=code, param=event.get("param")
    )


def to_api_error(exc: Exception, request_id: str | None = None) -> ApiError:
    """Return the ApiError that describes `exc`; unknown exceptions become a logged 500 naming the request."""
    match exc:
        case ApiError():
            return exc
        case InvalidRequestError():
            return ApiError(exc.message, status=400, param=exc.param, code=exc.code)
        case ValidationError():
            return _from_validation_error(exc)
        case ApiKeyRejected():
            return ApiError(exc.message, status=401, code="invalid_api_key")
        case RateLimited():
            return ApiError(
                exc.message,
                status=429,
                code="rate_limit_exceeded",
                retry_after=exc.retry_after,
                # The openai SDK waits retry-after-ms (finer than whole seconds) when it is there.
                headers=exc.headers | {"retry-after-ms": str(max(1, round(exc.retry_after_s * 1000)))},
            )
        case QuotaExceeded():
            # OpenAI's shape for a spent quota; x-should-retry tells SDKs not to retry in a loop.
            return ApiError(
                exc.message,
                status=429,
                code="insufficient_quota",
                error_type="insufficient_quota",
                headers={"x-should-retry": "false"},
            )
        case AuthenticationError():
            return ApiError("Invalid authentication.", status=401, code="invalid_api_key")
        case CapacityError():
            return ApiError(str(exc) or "The server is busy; retry shortly.", status=503, code="overloaded")
        case ModelLoading():
            return ApiError(str(exc), status=503, code="model_loading", retry_after=MODEL_LOADING_RETRY_S)
        case ModelLoadError():
            return ApiError(f"The model is unavailable: {exc}", status=503, code="model_unavailable")
        case redis.ConnectionError() | redis.TimeoutError():
            # Redis (the job queue, the rate-limit buckets) is down or restarting: a retry soon will work.
            logger.warning("Redis is unreachable: %s", exc)
            return ApiError(
                "The job queue is unavailable; retry shortly.", status=503, code="service_unavailable"
            )
        case OperationalError():
            # The database is down, restarting or out of connections: nothing is wrong with the request.
            logger.warning("the database is unavailable: %s", exc)
            return ApiError(
                "The database is unavailable; retry shortly.", status=503, code="service_unavailable"
            )
        case RequestDataTooBig():
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            return ApiError(
                f"The request body is larger than the limit of {limit} bytes.",
                status=413,
                code="request_too_large",
            )
        case PermissionDenied():
            return ApiError(str(exc) or "Permission denied.", status=403, code="permission_denied")
        case Http404():
            return ApiError(str(exc) or "Not found.", status=404, code="not_found")
        case HttpError():
            return ApiError(exc.message, status=exc.status_code)
    logger.error("unhandled error in the API (request %s)", request_id, exc_info=exc)
    return internal_error(request_id)


def _from_validation_error(exc: ValidationError) -> ApiError:
    """Return a 400 naming the first invalid field, as OpenAI does (ninja would answer 422 with a list)."""
    first = exc.errors[0] if exc.errors else {}
    # ninja's loc starts with the source; a JSON body then has the view's argument name before the field path.
    loc = list(first.get("loc", ()))
    path = [str(p) for p in (loc[2:] if loc[:1] == ["body"] else loc[1:])]
    param = ".".join(path) or None
    message = str(first.get("msg", "Invalid request."))
    return ApiError(f"{param}: {message}" if param else message, status=400, param=param)


def error_response(exc: Exception, request_id: str | None = None) -> JsonResponse:
    """Return the JSON error response for `exc`, with its headers (Retry-After when retrying later can help)."""
    error = to_api_error(exc, request_id)
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def install_error_handlers(api: NinjaAPI) -> None:
    """Route every exception the API sees, ninja's own included, through error_response."""

    def handler(request: HttpRequest, exc: Any) -> JsonResponse:
        return error_response(exc, getattr(request, "request_id", None))

    for exc_class in (Exception, Http404, HttpError, ValidationError):
        api.add_exception_handler(exc_class, handler)
