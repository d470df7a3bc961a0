"""A closed-loop HTTP load generator: N concurrent clients, each sending back to back.

A client refused with ``503`` waits its ``Retry-After`` before sending again, as
the README asks clients to; refusals are counted apart from errors. The
overload point (``run_overload``) is the exception: its clients ignore
``Retry-After``, the harshest load.
"""

import asyncio
import time
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    refused: int
    duration_s: float
    latencies_ms: list[float]

    def summary(self) -> dict:
        ok = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "throughput_rps": (self.requests - self.errors - self.refused) / self.duration_s,
            "p50_ms": float(np.percentile(ok, 50)),
            "p95_ms": float(np.percentile(ok, 95)),
            "p99_ms": float(np.percentile(ok, 99)),
            "error_rate": self.errors / max(self.requests, 1),
            "refused_rate": self.refused / max(self.requests, 1),
        }


async def _run(url: str, payload: dict, concurrency: int, duration_s: float, warmup_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.monotonic()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s
        latencies: list[float] = []
        counts = {"requests": 0, "errors": 0, "refused": 0}

        async def worker() -> None:
            while (now := time.monotonic()) < stop_at:
                retry_after_s = 0.0
                try:
                    response = await client.post(url, json=payload)
                    outcome = {200: "ok", 503: "refused"}.get(response.status_code, "errors")
                    if outcome == "refused":
                        retry_after_s = _seconds(response.headers.get("retry-after", "1"))
                except httpx.HTTPError:
                    outcome = "errors"
                done = time.monotonic()
                if now >= measure_from:  # only requests sent after warm-up count
                    counts["requests"] += 1
                    if outcome == "ok":
                        latencies.append((done - now) * 1000)
                    else:
                        counts[outcome] += 1
                await asyncio.sleep(min(retry_after_s, max(0.0, stop_at - done)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - measure_from
    return LoadResult(concurrency, counts["requests"], counts["errors"], counts["refused"], elapsed, latencies)


def _seconds(retry_after: str) -> float:
    """A ``Retry-After`` in seconds (this API sends seconds; an HTTP date counts as 1 s)."""
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 1.0


def run_load(url: str, payload: dict, concurrency: int, duration_s: float, warmup_s: float = 2.0) -> dict:
    """Drive ``url`` with ``concurrency`` clients for ``duration_s`` after a warm-up; return the summary."""
    return asyncio.run(_run(url, payload, concurrency, duration_s, warmup_s)).summary()


def _ingress_ms(response: httpx.Response) -> float | None:
    """The ingress's own time for a response, from its ``Server-Timing: ingress;dur=<ms>`` header."""
    timing = response.headers.get("server-timing", "")
    return float(timing.split("dur=")[1]) if "ingress;dur=" in timing else None


async def _overload(url: str, payload: dict, probe_url: str, concurrency: int, duration_s: float) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        stop_at = time.monotonic() + duration_s
        served: list[float] = []
        refused_client: list[float] = []
        refused_ingress: list[float] = []
        other: dict[int, int] = {}
        probes: list[float] = []

        async def worker() -> None:
            while (start := time.monotonic()) < stop_at:
                try:
                    response = await client.post(url, json=payload)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                elapsed_ms = (time.monotonic() - start) * 1000
                if status == 200:
                    served.append(elapsed_ms)
                elif status == 503 and response.headers.get("retry-after"):
                    refused_client.append(elapsed_ms)
                    if (ingress := _ingress_ms(response)) is not None:
                        refused_ingress.append(ingress)
                else:
                    other[status] = other.get(status, 0) + 1

        async def prober() -> None:
            while (start := time.monotonic()) < stop_at:
                response = await client.get(probe_url)
                probes.append((time.monotonic() - start) * 1000 if response.status_code == 200 else float("inf"))
                await asyncio.sleep(0.5)

        await asyncio.gather(*(worker() for _ in range(concurrency)), prober())

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "concurrency": concurrency,
        "served_rps": len(served) / duration_s,
        "served_p50_ms": pct(served, 50),
        "refused": len(refused_client),
        "refused_ingress_p50_ms": pct(refused_ingress, 50),
        "refused_ingress_p99_ms": pct(refused_ingress, 99),
        "refused_client_p50_ms": pct(refused_client, 50),
        "refused_client_p99_ms": pct(refused_client, 99),
        "other_statuses": other,
        "healthz_max_ms": max(probes) if probes else float("nan"),
        "healthz_probes": len(probes),
    }


def run_overload(url: str, payload: dict, probe_url: str, concurrency: int, duration_s: float) -> dict:
    """``concurrency`` clients that resend at once, ignoring Retry-After (the harshest overload), and a
    ``/healthz`` probe every 0.5 s. Refusal times are read at the ingress (Server-Timing) and at the client."""
    return asyncio.run(_overload(url, payload, probe_url, concurrency, duration_s))
