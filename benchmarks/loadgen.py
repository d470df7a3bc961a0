"""A closed-loop HTTP load generator: N concurrent clients, each sending back to back."""

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
    duration_s: float
    latencies_ms: list[float]

    def summary(self) -> dict:
        ok = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "throughput_rps": (self.requests - self.errors) / self.duration_s,
            "p50_ms": float(np.percentile(ok, 50)),
            "p95_ms": float(np.percentile(ok, 95)),
            "p99_ms": float(np.percentile(ok, 99)),
            "error_rate": self.errors / max(self.requests, 1),
        }


async def _run(url: str, payload: dict, concurrency: int, duration_s: float, warmup_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.monotonic()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s
        latencies: list[float] = []
        counts = {"requests": 0, "errors": 0}

        async def worker() -> None:
            while (now := time.monotonic()) < stop_at:
                try:
                    response = await client.post(url, json=payload)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.monotonic()
                if now >= measure_from:  # only requests sent after warm-up count
                    counts["requests"] += 1
                    if ok:
                        latencies.append((done - now) * 1000)
                    else:
                        counts["errors"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - measure_from
    return LoadResult(concurrency, counts["requests"], counts["errors"], elapsed, latencies)


def run_load(url: str, payload: dict, concurrency: int, duration_s: float, warmup_s: float = 2.0) -> dict:
    """Drive ``url`` with ``concurrency`` clients for ``duration_s`` after a warm-up; return the summary."""
    return asyncio.run(_run(url, payload, concurrency, duration_s, warmup_s)).summary()
