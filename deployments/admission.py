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

from api.policy import Matcher, RouteTable
from deployments.errors import MaasError, Overloaded


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


def error_body(family: str, error: MaasError) -> bytes:
    """The body of an error that is answered before the app sees the request (a refusal here, HAProxy's own
    errors in ``deployments.haproxy``) in a route family's error shape: OpenAI's for ``openai``, the Open
    Inference Protocol's for ``v2``, ``{"detail": [...]}`` for the rest."""
    if family == "openai":
        kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
        body = {"message": error.message, "type": kind, "param": None, "code": error.error_type}
        return json.dumps({"error": body}).encode()
    if family == "v2":
        return json.dumps({"error": error.message}).encode()
    return json.dumps({"detail": error.detail()}).encode()


class AdmissionMiddleware:
    """ASGI middleware: admits at most ``limits[route]`` HTTP requests at once per route; refuses the rest.

    ``limits`` are keyed by route template (``/v1/text/embed``, ``/v2/models/{model_name}/infer``); a path
    counts against the template it matches, and a route whose policy ``shares`` another's count (a model's
    versioned path) against that one. ``routes`` is the app's route table (``api.policy``); a key it does not
    declare is matched as a template of its own.

    A refusal is ``503`` with ``Retry-After`` and the body the ingress gives its own refusals, in the route
    family's shape (``{"detail": [{"loc": [], "msg": ..., "type": "overloaded"}]}``, ``{"error": ...}`` under
    ``/v2``, OpenAI's error object on its routes), sent before the body is read. It carries the request's
    ``X-Request-ID`` (the client's, else a new one) and ``Server-Timing: proxy;dur=<ms>``. Paths without a
    limit pass through. ``on_refused(route)`` is called for each refusal (a metric); ``route`` is one of the
    configured templates, never client text.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: dict[str, int],
        retry_after_s: int = 1,
        on_refused: Callable[[str], None] | None = None,
        routes: RouteTable | None = None,
    ) -> None:
        self.app = app
        self.admission = Admission(limits, retry_after_s)
        self.on_refused = on_refused
        self.counts = dict(zip(limits, limits))  # template matched -> the count it is admitted against
        for template, policy in (routes or {}).items():
            if policy.shares in limits and template not in limits:
                self.counts[template] = policy.shares
        self.matcher = Matcher(list(self.counts))
        self.refusal_bodies = {
            key: error_body(routes.family_of(key) if routes else _family(key), self.admission.refusal(key))
            for key in limits
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        template = self.matcher.match(scope.get("path", "")) if scope["type"] == "http" else None
        if template is None:
            await self.app(scope, receive, send)
            return
        key = self.counts[template]
        start = time.perf_counter()
        if not self.admission.acquire(key):
            await self.refuse(scope, send, key, start)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release(key)

    async def refuse(self, scope: Scope, send: Send, key: str, start: float) -> None:
        if self.on_refused is not None:
            self.on_refused(key)
        request_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        body = self.refusal_bodies[key]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"%d" % self.admission.retry_after_s),
            (b"x-request-id", request_id or str(uuid.uuid4()).encode()),
            (b"server-timing", b"proxy;dur=%.1f" % ((time.perf_counter() - start) * 1000)),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _family(path: str) -> str:
    return "v2" if path.startswith("/v2/") else "v1"
