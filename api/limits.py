"""Rate limits per API key: a token bucket of requests, and one of language-model tokens.

Where the buckets live decides whether a limit holds: the app has several ingress replicas, each a process of
its own, and an in-process bucket per replica would let a key through N times over. So the buckets live in
one Ray actor per application (``RateLimits``, named after the app, no CPU reserved), and every replica asks it
(``SharedLimits``). One call per limited request costs about a millisecond; keys without a limit never call it.

The actor belongs to the ingress replica that started it. When that replica goes (an update, a failure), the
next request from another replica starts a new one, with full buckets: a key may get one extra burst per
ingress replacement. While the actor cannot be reached, each replica limits with buckets of its own (the same
arithmetic, in process), so a key's limit may be exceeded at most N-fold, never left unlimited, and no request
waits on a missing actor for more than ``CALL_TIMEOUT_S``.

The arithmetic: a bucket holds up to ``capacity`` and refills at ``rate`` per second. A request takes one
request token or is refused with the seconds until one is there. Language-model tokens and seconds of audio
are known only after the request's body is read (or its answer made), so a request is admitted while its
key's token and audio buckets are not empty, and what it used is taken afterwards; a bucket may go into debt,
and the key's next requests wait until it is repaid.
``limits`` and ``slowapi`` count fixed or moving windows, not a token bucket with a burst, and cannot charge
after the fact, so the twenty lines are here.
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import ray

from api.keys import ApiKey

logger = logging.getLogger("ray.serve")

CALL_TIMEOUT_S = 1.0
"""A limit check waits at most this for the shared actor, then limits locally."""
START_TIMEOUT_S = 10.0
"""How long the first call may wait for the actor to start (a new worker process)."""


@dataclass
class TokenBucket:
    rate: float  # refill per second
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` if it is there: 0.0. Else take nothing: the seconds until it will be there."""
        self.refill(now)
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def owe(self, amount: float, now: float) -> None:
        """Take ``amount`` whether or not it is there (the bucket goes into debt)."""
        self.refill(now)
        self.level -= amount

    def wait(self, now: float) -> float:
        """Seconds until the bucket is not empty (0.0: it is not)."""
        self.refill(now)
        return 0.0 if self.level > 0 else (1e-9 - self.level) / self.rate


class RateLimits:
    """Every key's buckets. Used in process, or as the app's shared Ray actor (``ray.remote(RateLimits)``):
    a plain actor runs one call at a time, so a check and its take are one step."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, key_id: str, kind: str, rate: float, capacity: float) -> TokenBucket:
        bucket = self.buckets.get((key_id, kind))
        if bucket is None:
            bucket = self.buckets[(key_id, kind)] = TokenBucket(rate, capacity, capacity, self.clock())
        elif (bucket.rate, bucket.capacity) != (rate, capacity):  # the key's limit was changed: keep its level
            bucket.refill(self.clock())
            bucket.rate, bucket.capacity, bucket.level = rate, capacity, min(bucket.level, capacity)
        return bucket

    def admit(
        self, key_id: str, requests_per_s: float, capacity: float, per_minute: dict[str, float] | None = None
    ) -> float:
        """0.0 and one request taken, or the seconds until the key may send its next request. ``per_minute``:
        the key's limits of what is charged after the request (``tokens``, ``audio``), by kind."""
        now = self.clock()
        for kind, limit in (per_minute or {}).items():
            waited = self._bucket(key_id, kind, limit / 60, limit).wait(now)
            if waited > 0:
                return waited
        return self._bucket(key_id, "requests", requests_per_s, capacity).take(1.0, now)

    def charge(self, key_id: str, kind: str, per_minute: float, amount: float) -> None:
        """Take what a request used (language-model tokens, seconds of audio) from its key's bucket of ``kind``."""
        self._bucket(key_id, kind, per_minute / 60, per_minute).owe(amount, self.clock())

    def ping(self) -> bool:
        return True


def retry_after(seconds: float) -> int:
    """``Retry-After`` is whole seconds; round up, so a client that waits it is let through."""
    return max(1, math.ceil(seconds))


class SharedLimits:
    """An ingress replica's view of the app's ``RateLimits`` actor, with in-process buckets when it is away."""

    def __init__(self, name: str):
        self.name = name
        self.local = RateLimits()
        self._actor = None

    async def start(self) -> None:
        """Find or start the actor now (the ingress does when a key has a limit), so no request waits for it."""
        await self._call("ping")

    async def _call(self, method: str, *args):
        timeout_s = CALL_TIMEOUT_S
        if self._actor is None:
            timeout_s = START_TIMEOUT_S
            options = {"name": self.name, "get_if_exists": True, "num_cpus": 0, "max_concurrency": 1}
            self._actor = ray.remote(RateLimits).options(**options).remote()
        try:
            return await asyncio.wait_for(getattr(self._actor, method).remote(*args), timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            self._actor = None  # gone or slow: look it up (or start it) again next time
            logger.warning(
                "rate limits: the shared actor did not answer (%s); limiting in this replica", type(exc).__name__
            )
            return getattr(self.local, method)(*args)

    async def admit(self, key: ApiKey) -> float:
        limit = key.rate_limit
        if limit is None:
            return 0.0
        return await self._call("admit", key.id, limit.requests_per_s, limit.capacity, _per_minute(limit))

    async def charge(self, key: ApiKey, used: dict[str, float]) -> None:
        """Take what a request used (``{"tokens": n, "audio": seconds}``) from the key's buckets that limit it."""
        limits = _per_minute(key.rate_limit) if key.rate_limit else {}
        for kind, amount in used.items():
            if kind in limits and amount > 0:
                await self._call("charge", key.id, kind, limits[kind], amount)


def _per_minute(limit) -> dict[str, float]:
    """A key's limits of what is charged after the request, by kind."""
    kinds = {"tokens": limit.tokens_per_minute, "audio": limit.audio_seconds_per_minute}
    return {kind: value for kind, value in kinds.items() if value}
