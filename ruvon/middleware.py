"""Django's browser-facing middlewares (sessions, CSRF, login, messages, framing headers) for the pages only,
and django-prometheus' middlewares on the event loop.

They are sync middlewares: under ASGI each of their hooks runs through asgiref's one thread for sync code, two
thread hops per middleware per request, and every concurrent request queues for that same thread. The
OpenAI-compatible API under /v1/ authenticates with API keys and sets no cookies, so none of the page
middlewares has anything to do there: an API request passes straight to the next layer, a page request runs
them as Django would. The Prometheus middlewares only count and time (in-memory metrics, no I/O), so their
hooks run on the event loop itself, for every request.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Messages
from django.contrib.sessions.middleware import SessionMiddleware as _Sessions
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware as _XFrameOptions
from django.middleware.common import CommonMiddleware as _Common
from django.middleware.csrf import CsrfViewMiddleware as _Csrf
from django_prometheus.middleware import PrometheusAfterMiddleware as _PrometheusAfter
from django_prometheus.middleware import PrometheusBeforeMiddleware as _PrometheusBefore

API_PREFIX = "/v1/"
_HOOKS = ("process_view", "process_exception", "process_template_response")


def is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith(API_PREFIX)


class PagesOnly:
    """Mixed in before a Django middleware class: it runs for pages and not for API requests. The result is
    still a subclass of the Django class, which the admin's system checks look for."""

    get_response: Any

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)  # type: ignore[call-arg]
        # The handler collects these hooks from the instance; each one is skipped on API requests too.
        for hook in _HOOKS:
            if hasattr(self, hook):
                setattr(self, hook, _pages_only(getattr(self, hook)))

    def __call__(self, request: HttpRequest) -> Any:
        if is_api(request) and not iscoroutinefunction(self):
            return self.get_response(request)
        return super().__call__(request)  # type: ignore[misc]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if is_api(request):
            response: HttpResponseBase = await self.get_response(request)
            return response
        return await super().__acall__(request)  # type: ignore[misc,no-any-return]


def _pages_only(hook: Any) -> Any:
    """Return `hook` as a coroutine function that does nothing on API requests: the (ASGI) handler awaits it
    on the event loop, so an API request costs no thread hop; a page's call runs the hook in the sync thread.
    process_template_response(request, response) hands its response on; the other hooks return None."""
    to_thread = sync_to_async(hook)
    passes_response = hook.__name__ == "process_template_response"

    async def run(request: HttpRequest, *args: Any) -> Any:
        if is_api(request):
            return args[0] if passes_response else None
        return await to_thread(request, *args)

    return run


class SessionMiddleware(PagesOnly, _Sessions):
    pass


class CommonMiddleware(PagesOnly, _Common):
    pass


class CsrfViewMiddleware(PagesOnly, _Csrf):
    pass


class AuthenticationMiddleware(PagesOnly, _Authentication):
    pass


class MessageMiddleware(PagesOnly, _Messages):
    pass


class XFrameOptionsMiddleware(PagesOnly, _XFrameOptions):
    pass


class OnTheLoop:
    """Mixed in before a Django middleware class whose hooks do no I/O and never block: under ASGI they are
    called on the event loop, not through asgiref's thread (a thread hop each, about 0.13 ms of CPU). Under
    WSGI (the sync stack) the class runs as Django's."""

    get_response: Any

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)  # type: ignore[call-arg]
        if iscoroutinefunction(self):  # MiddlewareMixin marks an instance that serves the async stack
            # Not process_template_response: only pages return template responses, and Django names the
            # middleware of that hook by its bound method's __self__.
            for hook in ("process_view", "process_exception"):
                if hasattr(self, hook):
                    setattr(self, hook, _on_the_loop(getattr(self, hook)))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        process_request = getattr(self, "process_request", None)
        response = process_request(request) if process_request else None
        response = response or await self.get_response(request)
        process_response = getattr(self, "process_response", None)
        return process_response(request, response) if process_response else response  # type: ignore[no-any-return]


def _on_the_loop(hook: Any) -> Any:
    """Return `hook` as a coroutine function that calls it directly: the handler awaits coroutine hooks as they
    are and sends plain ones through a thread."""

    async def run(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return hook(request, *args, **kwargs)

    return run


class PrometheusBeforeMiddleware(OnTheLoop, _PrometheusBefore):
    pass


class PrometheusAfterMiddleware(OnTheLoop, _PrometheusAfter):
    pass
