"""Request ids, Prometheus metrics and the access log, as a plain ASGI middleware.

A plain ASGI wrapper rather than ``@app.middleware("http")``: that one runs every request
through a task group and memory streams, on the event loop that also parses every predict
request, and wraps streamed responses (Server-Sent Events) in another stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cvxtune.api")

REQUESTS = Counter("cvxtune_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "cvxtune_http_request_seconds",
    "HTTP request latency (to the response's first byte)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and value:
            return str(value.decode("latin-1"))
    return uuid.uuid4().hex[:16]


def _route_path(scope: Scope) -> str:
    """The matched route's template (/v1/heads/{head_id}), so ids do not multiply labels."""
    return str(getattr(scope.get("route"), "path", "unmatched"))


class Observe:
    """Echo or assign `x-request-id`, count and time each HTTP request by route template and
    status, and log one line when its response starts (for a stream: when it opens)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        start = time.perf_counter()
        started = False

        def record(status: int) -> None:
            elapsed = time.perf_counter() - start
            method, path = scope["method"], _route_path(scope)
            REQUESTS.labels(method, path, str(status)).inc()
            LATENCY.labels(method, path).observe(elapsed)
            log.info(
                "%s %s %s %.1fms request_id=%s",
                method,
                scope["path"],
                status,
                elapsed * 1000,
                request_id,
            )

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                headers: list[Any] = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
                record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if not started:  # the server answers 500 for what escaped the app
                record(500)
            raise
