"""Admission control: a bound on the requests in flight per route, decided before any work.

Under overload a refusal is only useful if it is fast. Without a bound, every
request is read, parsed and its image decoded before a model's queue refuses
it, and on a small node that work is what makes the refusals slow. So each
route admits at most its configured number of requests at once; the next one
is answered ``503`` with ``Retry-After`` at once, before its body is read.
Health, readiness and model listing are not bounded.

Two places use it:

* the ingress (:class:`Admission` per ingress replica, limits in its
  ``user_config``, live-tunable);
* the HTTP proxy (:class:`AdmissionMiddleware`, limits per proxy, i.e. per
  node, from ``deployments.proxy``'s settings). Refusing there saves the hop to
  an ingress replica and everything Serve and Ray do for it, which on a small
  node is most of what a refusal costs.
"""

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator

from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.errors import Overloaded

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")
"""Paths of the OpenAI-compatible API, whose errors are ``{"error": {"message", "type", "param", "code"}}``."""
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/multimodal/describe")
"""Paths whose answer a language model writes (streamed, or a description), with their own, longer request timeout:
at 8 concurrent descriptions on 2 cores the 99th percentile took 23 s, near the 30 s of other requests."""


class Admission:
    """Counts the requests in flight per route against a limit per route."""

    def __init__(self, limits: dict[str, int], retry_after_s: int = 1):
        self.limits = dict(limits)
        self.retry_after_s = retry_after_s
        self.in_flight = dict.fromkeys(self.limits, 0)

    def configure(self, limits: dict[str, int], retry_after_s: int) -> None:
        """New limits apply to the next request; requests in flight keep their slots."""
        self.limits = dict(limits)
        self.retry_after_s = retry_after_s
        for route in self.limits:
            self.in_flight.setdefault(route, 0)

    def refusal(self, route: str) -> Overloaded:
        return Overloaded(
            f"{route} is serving its limit of {self.limits[route]} requests at once; "
            f"retry after {self.retry_after_s} s",
            retry_after_s=self.retry_after_s,
        )

    def acquire(self, route: str) -> bool:
        """Take one of ``route``'s slots; False if none is free. Routes without a limit always get one."""
        limit = self.limits.get(route)
        if limit is not None and self.in_flight[route] >= limit:
            return False
        self.in_flight[route] = self.in_flight.get(route, 0) + 1
        return True

    def release(self, route: str) -> None:
        self.in_flight[route] -= 1

    @contextlib.contextmanager
    def slot(self, route: str) -> Iterator[None]:
        """Hold one of ``route``'s slots for the block, or raise ``Overloaded`` if none is free."""
        if not self.acquire(route):
            raise self.refusal(route)
        try:
            yield
        finally:
            self.release(route)


def refusal_body(path: str, refusal: Overloaded) -> bytes:
    """The ingress's own refusal body for ``path``: the Open Inference Protocol's shape under ``/v2``, OpenAI's
    on its paths."""
    if path in OPENAI_PATHS:
        error = {"message": refusal.message, "type": "server_error", "param": None, "code": refusal.error_type}
        return json.dumps({"error": error}).encode()
    if path.startswith("/v2/"):
        return json.dumps({"error": refusal.message}).encode()
    return json.dumps({"detail": refusal.detail()}).encode()


class AdmissionMiddleware:
    """ASGI middleware: admits at most ``limits[path]`` HTTP requests at once per path; refuses the rest.

    A refusal is ``503`` with ``Retry-After`` and the body the ingress gives
    its own refusals (``{"detail": [{"loc": [], "msg": ..., "type":
    "overloaded"}]}``, or ``{"error": ...}`` under ``/v2``), sent before the body is read. It carries the request's
    ``X-Request-ID`` (the client's, else a new one) and ``Server-Timing:
    proxy;dur=<ms>``. Paths without a limit pass through. ``on_refused(path)``
    is called for each refusal (a metric); ``path`` is one of the configured
    paths, never client text.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: dict[str, int],
        retry_after_s: int = 1,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.admission = Admission(limits, retry_after_s)
        self.on_refused = on_refused
        self.refusal_bodies = {path: refusal_body(path, self.admission.refusal(path)) for path in limits}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in self.refusal_bodies:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        if not self.admission.acquire(path):
            await self.refuse(scope, send, path, start)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release(path)

    async def refuse(self, scope: Scope, send: Send, path: str, start: float) -> None:
        if self.on_refused is not None:
            self.on_refused(path)
        request_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        body = self.refusal_bodies[path]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"%d" % self.admission.retry_after_s),
            (b"x-request-id", request_id or str(uuid.uuid4()).encode()),
            (b"server-timing", b"proxy;dur=%.1f" % ((time.perf_counter() - start) * 1000)),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
