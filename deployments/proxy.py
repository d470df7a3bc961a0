"""Hardening of Ray Serve's HTTP proxy against slow and untrusted clients.

Turn it on by setting, in the environment of every process that starts Ray
(the shell that runs ``serve run``, each ``ray start``, or the Ray container of
a KubeRay head group, and of any worker group that runs proxies)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:hardening

and, where the defaults do not suit, in the same place:

* ``MAAS_HTTP_HEADER_TIMEOUT_S`` (default 10): time to deliver a request head;
* ``MAAS_HTTP_MAX_HEADER_BYTES`` (default 65536): largest request head;
* ``MAAS_MAX_REQUEST_TIMEOUT_S`` (default 30): largest client-sent
  ``x-request-timeout-seconds``; keep it equal to the Serve config's
  ``http_options.request_timeout_s``.
* ``MAAS_GENERATION_TIMEOUT_S`` (default 300): the request timeout of the
  language-model routes, whose answers stream for longer; keep it equal to
  the ingress's ``generation_timeout_s``.
* ``MAAS_HTTP_ADMISSION`` (JSON object of route template or path to limit;
  default: the ``proxy`` limit each route's policy declares beside the route,
  ``api.policy``, or behind HAProxy its ``ingress`` limit; ``{}`` for none):
  requests in flight per route at this proxy (behind HAProxy, at this ingress
  replica's server). It replaces the defaults: name every route to be limited;
* ``MAAS_HTTP_RETRY_AFTER_S`` (default 1): ``Retry-After`` of its refusals.

The proxy actor inherits that environment from its raylet; an application's
``runtime_env`` never reaches it. ``deployments`` must be importable there (the
Makefile and ``kubernetes/Dockerfile`` install the project). Serve calls
``hardening()`` once when the proxy starts and wraps its ASGI app in the
middleware it returns, outside Serve's own ``RequestIdMiddleware``.

What it does:

* **Header-read deadline.** uvicorn has no timeout for reading a request head:
  it arms ``timeout_keep_alive`` only after a response, so a client that sends
  its headers one byte a second, or nothing at all, holds a connection forever.
  Serve builds the ``uvicorn.Config`` itself and passes on no timeout but
  ``keep_alive_timeout_s``, and a proxy callback is the only code of ours that
  runs in the proxy process, so ``hardening()`` wraps ``connection_made``,
  ``data_received`` and ``connection_lost`` of uvicorn's ``H11Protocol`` and
  ``HttpToolsProtocol`` (uvicorn's ``http="auto"``, which Serve uses, picks
  httptools when installed, else h11). A connection must deliver a complete
  request head within ``MAAS_HTTP_HEADER_TIMEOUT_S`` of connecting, or of the
  first byte of its next request on a kept-alive connection; otherwise it gets
  ``408 Request Timeout`` with ``connection: close`` (like nginx's
  ``client_header_timeout``) and is closed. An idle kept-alive connection is
  left to uvicorn's keep-alive timeout. The wrappers rely on the protocol
  attributes ``loop``, ``transport``, ``flow`` and ``cycle`` (with
  ``response_complete`` and ``more_body``); ``tests/unit/test_proxy.py`` runs
  real uvicorn servers with both classes, so a uvicorn release that changes
  them fails there.
* **Header-size cap.** h11 refuses a head over 16 KiB with a 400 by itself;
  httptools has no limit at all and builds long header values by repeated
  concatenation, so within the deadline a client could still send gigabytes at
  quadratic CPU cost. A head still incomplete after
  ``MAAS_HTTP_MAX_HEADER_BYTES`` (checked after each read, so by up to one read
  over) gets ``431`` and is closed, and bytes of a pipelined next request that
  arrive while a response is in flight pause reading (as uvicorn's h11 protocol
  does). The body is not bounded here: Serve's
  ``http_options.request_timeout_s`` covers the whole request, body reads
  included; an integration test against a real proxy is to verify that.
* **Client headers Serve trusts too far** (:class:`ClientHeaderFilter`). Serve
  echoes a client's ``X-Request-ID`` at any length and content, lets a
  client's ``x-request-timeout-seconds`` raise, or (with a value <= 0) disable,
  the operator's ``request_timeout_s``, and with
  ``x-request-disconnect-disabled: ?1`` keeps a request running on the models
  after its client hung up.
* **Admission** (:class:`deployments.admission.AdmissionMiddleware`). A path
  with ``MAAS_HTTP_ADMISSION``'s limit of requests in flight at this proxy gets
  the next one refused at once: ``503``, ``Retry-After`` and the ingress's
  ``overloaded`` error body, before the body is read and without the hop to an
  ingress replica. Under overload on a small node that hop (Serve's routing,
  the Ray call, the ingress's own request handling) is most of what a refusal
  costs, and it queues behind the admitted requests for CPU; refused here, a
  refusal costs well under a millisecond. The ingress's own admission (per
  replica, live-tunable) stays behind it for what several proxies send.
  Health, readiness and the rest pass through unbounded.
* **When the proxy received the request** (``x-maas-received-at``, Unix time
  in seconds, set by the proxy only). Serve's request timeout runs from here;
  the ingress counts its own deadline from it too, so that it gives up when
  the proxy does (not later by the time spent queueing and routing) and can
  tell a request the proxy timed out (408) from one whose client left (499).

* **The route, for HAProxy's request metrics** (:class:`RouteHeader`, only where Serve runs HAProxy,
  ``RAY_SERVE_ENABLE_HA_PROXY=1``). Each response names its route template in ``x-maas-route``; HAProxy
  labels Serve's request counter with it and removes the header (``deployments.haproxy``). Serve's Python
  proxy labels that counter by route itself.

Slow clients cut off by the deadline are counted in the Ray metric
``maas_http_slow_client_disconnects_total``, refusals in
``maas_http_proxy_refusals_total`` by route (scraped as ``ray_maas_...``).
"""

import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.policy import Matcher, declared_routes
from deployments.admission import AdmissionMiddleware

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_TIMEOUT_HEADER = b"x-request-timeout-seconds"
DISCONNECT_DISABLED_HEADER = b"x-request-disconnect-disabled"
RECEIVED_AT_HEADER = b"x-maas-received-at"
ROUTE_HEADER = b"x-maas-route"  # = deployments.haproxy.ROUTE_HEADER, which takes it off the response
MAX_REQUEST_ID_CHARS = 64
REQUEST_ID_PATTERN = re.compile(rb"[A-Za-z0-9._:-]{1,%d}" % MAX_REQUEST_ID_CHARS)
SLOW_CLIENT_DISCONNECTS_METRIC = "maas_http_slow_client_disconnects_total"
PROXY_REFUSALS_METRIC = "maas_http_proxy_refusals_total"


class ProxySettings(BaseSettings):
    """Limits the HTTP proxy enforces on clients, read from ``MAAS_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", frozen=True)

    http_header_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)
    """Time a connection has to deliver a complete request head."""
    http_max_header_bytes: int = Field(64 * 1024, gt=0)
    """Largest request head (request line and headers) accepted."""
    max_request_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    """Largest ``x-request-timeout-seconds`` a client may send; must equal the
    Serve config's ``http_options.request_timeout_s``."""
    generation_timeout_s: float = Field(300.0, gt=0, allow_inf_nan=False)
    """Request timeout of the routes whose policy says ``long`` (language-model answers, audio), which take
    longer than ``http_options.request_timeout_s``; keep it equal to the ingress's ``generation_timeout_s``."""
    http_admission: dict[str, int] | None = None
    """Requests in flight per route at this proxy (JSON object, route template or path to limit); ``{}`` turns it
    off. Unset: each route's ``proxy`` limit, as its policy declares it beside the route (``api.policy``)."""
    http_retry_after_s: int = Field(1, ge=1, le=3600)
    """``Retry-After`` of the proxy's refusals."""

    def admission_limits(self) -> dict[str, int]:
        """``MAAS_HTTP_ADMISSION``, else each route's declared limit: per proxy behind Serve's proxy; behind
        HAProxy, where this runs in each ingress replica's own server, per replica (the ingress's own limit, so
        that this cheap refusal, before Serve handles the request, comes first)."""
        if self.http_admission is not None:
            return self.http_admission
        routes = declared_routes()
        return routes.ingress_limits() if haproxy_enabled() else routes.proxy_limits()

    @field_validator("http_admission")
    @classmethod
    def _paths_and_limits(cls, limits: dict[str, int] | None) -> dict[str, int] | None:
        for path, limit in (limits or {}).items():
            if not path.startswith("/"):
                raise ValueError(f"admission paths start with '/': {path!r}")
            if limit < 1:
                raise ValueError(f"admission limits are at least 1: {path} has {limit}")
        return limits


def hardening() -> list[Middleware]:
    """Serve's HTTP proxy callback: installs the header deadline; returns admission and the header filter.

    Safe to call more than once: uvicorn is patched once per process, and a
    later call only updates the limits from the environment.
    """
    settings = ProxySettings()
    routes, limits = declared_routes(), settings.admission_limits()
    install_header_deadline(settings.http_header_timeout_s, settings.http_max_header_bytes)
    logger.info("HTTP requests in flight limited per route to %s.", limits or "nothing (off)")
    # Serve applies them in order, each around the last: the header filter runs first (or, behind HAProxy, the
    # route header, which so sees every response, Serve's own 408 and 503 included).
    behind_haproxy = [Middleware(RouteHeader, routes=routes)] if haproxy_enabled() else []
    return [
        Middleware(
            AdmissionMiddleware,
            limits=limits,
            retry_after_s=settings.http_retry_after_s,
            on_refused=_count_refusal,
            routes=routes,
        ),
        Middleware(
            ClientHeaderFilter,
            max_request_timeout_s=settings.max_request_timeout_s,
            generation_timeout_s=settings.generation_timeout_s,
            long_routes=routes.long_routes(),
        ),
        *behind_haproxy,
    ]


def haproxy_enabled() -> bool:
    """Whether Serve runs HAProxy in front of the ingress replicas (as ``make serve`` sets it up)."""
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


class RouteHeader:
    """ASGI middleware that names the route template of each response in ``x-maas-route`` (none for a path of
    no route), for HAProxy's request metrics. The template is the code's own, never the client's path."""

    def __init__(self, app: ASGIApp, routes) -> None:
        self.app = app
        self.routes = Matcher(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        template = self.routes.match(scope.get("path", ""))
        if template is None:
            return await self.app(scope, receive, send)
        value = template.encode()

        async def send_with_route(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (ROUTE_HEADER, value)]
            await send(message)

        await self.app(scope, receive, send_with_route)


class ClientHeaderFilter:
    """ASGI middleware that drops client headers Serve would otherwise trust.

    * ``x-request-id`` longer than 64 characters, empty, or with characters
      outside ``[A-Za-z0-9._:-]``: Serve then generates its own id and returns it.
    * ``x-request-timeout-seconds`` unless it is a number with
      ``0 < value <= max_request_timeout_s``: a client may ask for a shorter
      deadline, never a longer or disabled one. On the routes whose policy
      says ``long`` (``long_routes``: language-model answers, audio) the bound
      is ``generation_timeout_s``, and a request without a valid value gets
      that: Serve's timeout covers the whole streamed answer.
    * ``x-request-disconnect-disabled``: a client that hangs up has its
      request cancelled.
    * ``x-maas-received-at``: replaced by the time the proxy received the
      request.

    Header values are never logged. The body passes through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_request_timeout_s: float,
        generation_timeout_s: float | None = None,
        long_routes: list[str] = (),
    ) -> None:
        self.app = app
        self.max_request_timeout_s = max_request_timeout_s
        self.generation_timeout_s = generation_timeout_s or max_request_timeout_s
        self.long_routes = Matcher(long_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            received_at = (RECEIVED_AT_HEADER, b"%.6f" % time.time())
            limit = self.max_request_timeout_s
            if self.long_routes.match(scope.get("path", "")):
                limit = self.generation_timeout_s
            headers = [(name, value) for name, value in scope["headers"] if self.is_acceptable(name, value, limit)]
            if limit != self.max_request_timeout_s and not any(name == REQUEST_TIMEOUT_HEADER for name, _ in headers):
                headers.append((REQUEST_TIMEOUT_HEADER, b"%g" % limit))
            scope = {**scope, "headers": [*headers, received_at]}
        await self.app(scope, receive, send)

    def is_acceptable(self, name: bytes, value: bytes, max_timeout_s: float | None = None) -> bool:
        """Whether the header ``name: value`` (ASGI form: lower-case name, bytes) may reach Serve."""
        if name == REQUEST_ID_HEADER:
            return REQUEST_ID_PATTERN.fullmatch(value) is not None
        if name == DISCONNECT_DISABLED_HEADER or name == RECEIVED_AT_HEADER:
            return False
        if name == REQUEST_TIMEOUT_HEADER:
            try:
                timeout_s = float(value)
            except ValueError:
                return False
            # NaN fails both comparisons, infinity the second.
            return 0 < timeout_s <= (max_timeout_s or self.max_request_timeout_s)
        return True


def _plain_response(status: bytes, text: bytes) -> bytes:
    return b"".join(
        [
            b"HTTP/1.1 " + status + b"\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(text)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            text,
        ]
    )


REQUEST_TIMEOUT_RESPONSE = _plain_response(b"408 Request Timeout", b"Request header not received in time.\n")
HEADER_TOO_LARGE_RESPONSE = _plain_response(b"431 Request Header Fields Too Large", b"Request header too large.\n")

WRAPPED_METHODS = ("connection_made", "data_received", "connection_lost")
ORIGINAL_METHODS_ATTR = "_maas_original_methods"
"""Class attribute of a patched protocol class: its unwrapped methods, by name."""

_header_timeout_s = ProxySettings.model_fields["http_header_timeout_s"].default
_max_header_bytes = ProxySettings.model_fields["http_max_header_bytes"].default
_counters: dict[str, Any] = {}
"""The proxy's Ray counters by name, created on first use."""


def uvicorn_http_protocol_classes() -> list[type]:
    """uvicorn's HTTP/1.1 protocol classes that its ``http="auto"`` may pick."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    classes: list[type] = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: "auto" picks h11
        pass
    else:
        classes.append(HttpToolsProtocol)
    return classes


def install_header_deadline(timeout_s: float, max_header_bytes: int) -> list[type]:
    """Wrap uvicorn's HTTP protocol classes (once) and set the head deadline and size cap.

    Returns the patched classes. Their original methods stay in the class
    attribute named by ``ORIGINAL_METHODS_ATTR``.
    """
    global _header_timeout_s, _max_header_bytes
    _header_timeout_s = timeout_s
    _max_header_bytes = max_header_bytes
    classes = uvicorn_http_protocol_classes()
    for cls in classes:
        # Checked in the class's own namespace, so a reloaded module does not wrap twice.
        if ORIGINAL_METHODS_ATTR in vars(cls):
            continue
        originals = {name: getattr(cls, name) for name in WRAPPED_METHODS}
        cls.connection_made = _wrap_connection_made(originals["connection_made"])
        cls.data_received = _wrap_data_received(originals["data_received"])
        cls.connection_lost = _wrap_connection_lost(originals["connection_lost"])
        # Per-connection state, defaulted on the class so connections opened before the patch work too.
        cls._maas_header_deadline = None
        cls._maas_header_bytes = 0
        setattr(cls, ORIGINAL_METHODS_ATTR, originals)
    logger.info(
        "HTTP request heads limited to %g s and %d bytes on %s.",
        timeout_s,
        max_header_bytes,
        ", ".join(cls.__name__ for cls in classes),
    )
    return classes


def uninstall_header_deadline() -> None:
    """Restore uvicorn's original protocol methods (for tests)."""
    for cls in uvicorn_http_protocol_classes():
        originals = vars(cls).get(ORIGINAL_METHODS_ATTR)
        if originals is None:
            continue
        for name, method in originals.items():
            setattr(cls, name, method)
        for attr in (ORIGINAL_METHODS_ATTR, "_maas_header_deadline", "_maas_header_bytes"):
            delattr(cls, attr)


def _wrap_connection_made(original: Callable) -> Callable:
    @functools.wraps(original)
    def connection_made(self, transport) -> None:
        original(self, transport)
        self._maas_header_deadline = self.loop.call_later(_header_timeout_s, _on_header_deadline, self)
        self._maas_header_bytes = 0

    return connection_made


def _wrap_data_received(original: Callable) -> Callable:
    @functools.wraps(original)
    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        # In a request: until its response is complete and, for a response sent before the body was read
        # (a 413, say), until the rest of that body has been received and discarded.
        if cycle is not None and (not cycle.response_complete or cycle.more_body):
            request_fully_read = not cycle.more_body
            original(self, data)
            # Bytes after a fully read request start a pipelined next one: stop reading until the response is
            # done (uvicorn resumes then), so they cannot pile up in the parser uncounted.
            if request_fully_read and not self.transport.is_closing():
                self.flow.pause_reading()
            return

        # Between requests, or inside a request head.
        deadline = self._maas_header_deadline
        if deadline is None:
            deadline = self._maas_header_deadline = self.loop.call_later(_header_timeout_s, _on_header_deadline, self)
            self._maas_header_bytes = 0
        original(self, data)
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.transport.get_protocol() is not self:
            # The head is complete (a request is running) or the connection became a WebSocket.
            deadline.cancel()
            self._maas_header_deadline = None
            return
        self._maas_header_bytes += len(data)
        if self._maas_header_bytes > _max_header_bytes:
            _reject(self, HEADER_TOO_LARGE_RESPONSE)

    return data_received


def _wrap_connection_lost(original: Callable) -> Callable:
    @functools.wraps(original)
    def connection_lost(self, exc: Exception | None) -> None:
        deadline = self._maas_header_deadline
        if deadline is not None:
            deadline.cancel()
            self._maas_header_deadline = None
        original(self, exc)

    return connection_lost


def _reject(protocol: Any, response: bytes) -> bool:
    """Answer ``response`` and close the connection; False if it was already closing."""
    deadline = protocol._maas_header_deadline
    if deadline is not None:
        deadline.cancel()
        protocol._maas_header_deadline = None
    transport = protocol.transport
    if transport.is_closing():
        return False
    transport.write(response)
    transport.close()
    return True


def _on_header_deadline(protocol: Any) -> None:
    protocol._maas_header_deadline = None
    cycle = protocol.cycle
    # Never write over a response in flight; the wrappers cancel the timer before one starts.
    if cycle is not None and not cycle.response_complete:
        return
    if _reject(protocol, REQUEST_TIMEOUT_RESPONSE):
        _count_slow_client_disconnect()


def _ray_running() -> bool:
    # The proxy has ray imported already; elsewhere, importing it only to learn that it is not running costs seconds.
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _count_slow_client_disconnect() -> None:
    _count(
        SLOW_CLIENT_DISCONNECTS_METRIC,
        "HTTP connections closed with a 408 because the request head was not received in time.",
    )


def _count_refusal(path: str) -> None:
    _count(
        PROXY_REFUSALS_METRIC,
        "Requests the HTTP proxy refused with a 503 because their route had its limit in flight.",
        {"route": path},
    )


def _count(name: str, description: str, tags: dict[str, str] | None = None) -> None:
    """Add 1 to the Ray counter ``name`` (created on first use, with ``tags``' keys); nothing outside Ray."""
    if not _ray_running():
        return
    counter = _counters.get(name)
    if counter is None:
        from ray.util import metrics

        tag_keys = {"tag_keys": tuple(tags)} if tags else {}
        counter = _counters[name] = metrics.Counter(name, description=description, **tag_keys)
    counter.inc(tags=tags)
