"""What happens to every HTTP request around its route: its deadline, its metrics, its Server-Timing."""

import asyncio
import math
import time

from ray.exceptions import TaskCancelledError

from deployments.downstream import Deadline
from deployments.proxy import RECEIVED_AT_HEADER, REQUEST_TIMEOUT_HEADER  # the proxy sets or filters them
from monitoring.metrics import RequestMetrics


def request_timeout(scope: dict, configured_s: float) -> float:
    """The request's timeout: the configured one, or shorter where the client asked for less."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_TIMEOUT_HEADER:
            try:
                asked = float(value)
            except ValueError:
                break
            if math.isfinite(asked) and 0 < asked < configured_s:
                return asked
            break
    return configured_s


def waited_at_proxy(scope: dict, timeout_s: float) -> float:
    """Seconds since the proxy received the request (its ``x-maas-received-at``), within ``[0, timeout_s]``.

    0 where the header is missing or malformed (a proxy without
    ``deployments.proxy``). The proxy may run on another node; the clamp keeps
    clock skew from stretching a deadline or ending it early by more than it.
    """
    for name, value in scope.get("headers", ()):
        if name == RECEIVED_AT_HEADER:
            try:
                waited = time.time() - float(value)
            except ValueError:
                return 0.0
            return min(max(waited, 0.0), timeout_s) if math.isfinite(waited) else 0.0
    return 0.0


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template and status (plain ASGI, no body buffering).

    Gives each request its ``Deadline`` (``request.state.deadline``), counted
    from when the proxy received it, and a ``Server-Timing`` header with the
    time spent in the ingress. A request the proxy cancels is counted as
    ``408`` if it ran into its timeout (the proxy answered the client 408) and
    ``499`` otherwise (the client went away, as nginx logs it), never as ``500``.
    The error renderers record the error's type in ``request.state.error_type``.
    """

    def __init__(self, app, metrics: RequestMetrics, settings):
        self.app = app
        self.metrics = metrics
        self.settings = settings  # read per request: request_timeout_s is live-tunable

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        timeout_s = request_timeout(scope, self.settings.timeout_for(scope.get("path", "")))
        waited_s = waited_at_proxy(scope, timeout_s)
        scope.setdefault("state", {})["deadline"] = Deadline(timeout_s - waited_s)
        status = None

        async def send_and_record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                timing = f"ingress;dur={(time.perf_counter() - start) * 1000:.1f}".encode()
                message["headers"] = [*message.get("headers", []), (b"server-timing", timing)]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        except (asyncio.CancelledError, TaskCancelledError):
            # The proxy cancels the request; a body read waiting on the proxy sees it as Ray's TaskCancelledError.
            if status is None:
                status = 408 if waited_s + time.perf_counter() - start >= timeout_s - 0.05 else 499
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            status = status or 500
            error_type = None
            if status >= 400:
                error_type = scope["state"].get("error_type") or f"http_{status}"
            self.metrics.observe_request(route, status, time.perf_counter() - start, error_type)
