"""Admission control at the ingress: a bound on the requests in flight per route, decided before any work.

Under overload a refusal is only useful if it is fast. Without a bound here,
every request is read, parsed and its image decoded before a model's queue
refuses it, and on a small node that work is what makes the refusals slow. So
each route admits at most its configured number of requests at once (per
ingress replica); the next one is answered ``503`` with ``Retry-After`` at once,
before its body is read. Health, readiness and model listing are not bounded.
"""

import contextlib
from collections.abc import Iterator

from deployments.errors import Overloaded


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

    @contextlib.contextmanager
    def slot(self, route: str) -> Iterator[None]:
        """Hold one of ``route``'s slots for the block, or raise ``Overloaded`` if none is free."""
        limit = self.limits.get(route)
        if limit is not None and self.in_flight[route] >= limit:
            raise Overloaded(
                f"{route} is serving its limit of {limit} requests at once; retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self.in_flight[route] = self.in_flight.get(route, 0) + 1
        try:
            yield
        finally:
            self.in_flight[route] -= 1
