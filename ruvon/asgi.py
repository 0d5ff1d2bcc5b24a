"""The ASGI entry point: HTTP through Django (static files by WhiteNoise), websockets through Channels routing."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ruvon.settings")
# Django must be set up before anything imports models (the websocket consumers do).
from ruvon.request_threads import asgi_application  # noqa: E402

django_http = asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from gpu_worker import tracing  # noqa: E402
from inference.routing import websocket_urlpatterns  # noqa: E402
from ruvon import http_limits  # noqa: E402

http_limits.install()  # daphne serves this application through Twisted's HTTP channel
tracing.setup("ruvon-web")  # spans exported when OTEL_EXPORTER_OTLP_ENDPOINT is set

if settings.RUVON_WARM_START:
    from inference.transport import warm_start

    warm_start(os.environ.get("RUVON_READY_BANNER") or "Ruvon: ready")

application = ProtocolTypeRouter(
    {
        "http": django_http,  # static files: ruvon.static.StaticFilesMiddleware
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
