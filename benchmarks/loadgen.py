"""A closed-loop HTTP load generator: N concurrent clients, each sending back to back.

A client refused with ``503`` waits its ``Retry-After`` before sending again, as
the README asks clients to; refusals are counted apart from errors. The
overload points (``run_overload``, closed or open loop) are the exception: their
clients ignore ``Retry-After``, the harshest load.
"""

import asyncio
import concurrent.futures
import http.client
import json
import math
import multiprocessing
import os
import random
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np

from benchmarks import cpu


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    refused: int
    duration_s: float
    latencies_ms: list[float]
    cpu: dict[str, dict] | None = None  # CPU ms per answered request by process role (benchmarks.cpu)

    def summary(self) -> dict:
        ok = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {
            "cpu": self.cpu or {},
            "concurrency": self.concurrency,
            "requests": self.requests,
            "throughput_rps": (self.requests - self.errors - self.refused) / self.duration_s,
            "p50_ms": float(np.percentile(ok, 50)),
            "p95_ms": float(np.percentile(ok, 95)),
            "p99_ms": float(np.percentile(ok, 99)),
            "error_rate": self.errors / max(self.requests, 1),
            "refused_rate": self.refused / max(self.requests, 1),
        }


@dataclass
class ClosedLoopPart:
    """What one load process saw of a closed-loop point: each answered request's latency, and counts."""

    latencies_ms: list[float]
    requests: int
    errors: int
    refused: int


def _closed_loop_part(url: str, body: bytes, clients: int, measure_from: float, stop_at: float) -> ClosedLoopPart:
    """``clients`` aiohttp clients in this process, each sending back to back until wall time ``stop_at``;
    only requests sent from ``measure_from`` on count. A refused client waits its ``Retry-After``."""
    import aiohttp

    part = ClosedLoopPart([], 0, 0, 0)

    async def client(session: aiohttp.ClientSession) -> None:
        while (now := time.time()) < stop_at:
            retry_after_s = 0.0
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                    await response.read()
                    outcome = {200: "ok", 503: "refused"}.get(response.status, "errors")
                    if outcome == "refused":
                        retry_after_s = _seconds(response.headers.get("retry-after", "1"))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                outcome = "errors"
            done = time.time()
            if now >= measure_from:  # only requests sent after warm-up count
                part.requests += 1
                if outcome == "ok":
                    part.latencies_ms.append((done - now) * 1000)
                elif outcome == "refused":
                    part.refused += 1
                else:
                    part.errors += 1
            await asyncio.sleep(min(retry_after_s, max(0.0, stop_at - done)))

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(client(session) for _ in range(clients)))

    asyncio.run(run())
    return part


def run_load(
    url: str, payload: dict, concurrency: int, duration_s: float, warmup_s: float = 2.0, processes: int = 4
) -> dict:
    """Drive ``url`` with ``concurrency`` closed-loop clients for ``duration_s`` after a warm-up; the summary,
    with every process's CPU per answered request over the measured window (``benchmarks.cpu``).

    The clients are aiohttp sessions spread over up to ``processes`` processes, at this process's niceness:
    one process of httpx clients measured a third less throughput from the same cluster than these, its own
    event loop's queue showing up as the server's latency."""
    body = json.dumps(payload).encode()
    processes = min(processes, concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.2] * processes))  # every process up before the common start
        measure_from = time.time() + 0.5 + warmup_s
        stop_at = measure_from + duration_s
        futures = [pool.submit(_closed_loop_part, url, body, n, measure_from, stop_at) for n in shares]
        time.sleep(max(0.0, measure_from - time.time()))
        with cpu.Meter() as window:
            time.sleep(max(0.0, stop_at - time.time()))
        parts = [future.result() for future in futures]
    latencies = [ms for part in parts for ms in part.latencies_ms]
    return LoadResult(
        concurrency,
        sum(part.requests for part in parts),
        sum(part.errors for part in parts),
        sum(part.refused for part in parts),
        duration_s,
        latencies,
        window.per_request(len(latencies)),
    ).summary()


def _seconds(retry_after: str) -> float:
    """A ``Retry-After`` in seconds (this API sends seconds; an HTTP date counts as 1 s)."""
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 1.0


def _server_ms(server_timing: str) -> float | None:
    """The server's own time for a response, from its ``Server-Timing`` header: ``ingress;dur=<ms>`` or, for a
    refusal by the HTTP proxy's admission, ``proxy;dur=<ms>``."""
    for entry in server_timing.split(","):
        name, _, params = entry.strip().partition(";dur=")
        if name in ("ingress", "proxy") and params:
            return float(params)
    return None


RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))


def _share_cpu_with_ray_workers() -> None:
    """Run this process at the niceness Ray gives its workers (the proxy and replicas included).

    Ray starts workers at nice 15 so that its raylet and GCS come first. A load generator on the same node at
    nice 0 would get about 28 times their CPU share (the kernel's weights for nice 0 and 15) and starve the server
    it measures; real clients run elsewhere.
    """
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))


@dataclass
class OverloadPart:
    """What one load process saw: client-side milliseconds by outcome, and the server's for refusals."""

    served: list[float]
    refused_client: list[float]
    refused_server: list[float]
    refused_at_proxy: int
    other: dict[int, int]


def _overload_part(
    url: str, body: bytes, clients: int, rate_per_s: float | None, start_at: float, duration_s: float, seed: int
) -> OverloadPart:
    """Runs in a load process from wall time ``start_at`` for ``duration_s``.

    Closed loop (``rate_per_s`` None): ``clients`` clients, each sending again as soon as it has an answer.
    Open loop: requests arrive at ``rate_per_s`` (Poisson), whatever the answers, on at most ``clients``
    connections; an arrival with all of them busy is not sent and counted under status ``-1``.
    """
    import aiohttp

    _share_cpu_with_ray_workers()
    part = OverloadPart([], [], [], 0, {})

    async def send(session: aiohttp.ClientSession) -> None:
        start = time.monotonic()
        server_timing = ""
        retry_after = None
        try:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                await response.read()
                status = response.status
                retry_after = response.headers.get("retry-after")
                server_timing = response.headers.get("server-timing", "")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        elapsed_ms = (time.monotonic() - start) * 1000
        if status == 200:
            part.served.append(elapsed_ms)
        elif status == 503 and retry_after:
            part.refused_client.append(elapsed_ms)
            if (server_ms := _server_ms(server_timing)) is not None:
                part.refused_server.append(server_ms)
            part.refused_at_proxy += "proxy;" in server_timing
        else:
            part.other[status] = part.other.get(status, 0) + 1

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            stop_at = time.monotonic() + duration_s
            if rate_per_s is None:

                async def client() -> None:
                    while time.monotonic() < stop_at:
                        await send(session)

                await asyncio.gather(*(client() for _ in range(clients)))
                return
            arrivals = random.Random(seed)
            in_flight: set[asyncio.Task] = set()
            next_at = time.monotonic()
            while (next_at := next_at + arrivals.expovariate(rate_per_s)) < stop_at:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if len(in_flight) >= clients:
                    part.other[-1] = part.other.get(-1, 0) + 1
                    continue
                task = asyncio.create_task(send(session))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)

    asyncio.run(run())
    return part


def probe(url: str, start_at: float, duration_s: float, interval_s: float = 0.5, timeout_s: float = 5.0) -> list[float]:
    """GET ``url`` on a new connection every ``interval_s`` from wall time ``start_at`` for ``duration_s``, as a
    load balancer's health check does; milliseconds per probe, ``inf`` for one that failed or got no 200 within
    ``timeout_s``. Runs in its own process, so the load's busy event loops do not delay it.

    Plain ``http.client``: a new httpx client per probe would build a TLS context each time, tens of ms of the
    probe's own CPU that a busy machine stretches into seconds."""
    _share_cpu_with_ray_workers()
    target = urllib.parse.urlsplit(url)
    time.sleep(max(0.0, start_at - time.time()))
    latencies: list[float] = []
    stop_at = time.monotonic() + duration_s
    while (start := time.monotonic()) < stop_at:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout_s)
        try:
            connection.request("GET", target.path)
            response = connection.getresponse()
            response.read()
            ok = response.status == 200
        except OSError:  # refused, reset, timed out
            ok = False
        finally:
            connection.close()
        elapsed = time.monotonic() - start
        latencies.append(elapsed * 1000 if ok and elapsed < timeout_s else float("inf"))
        time.sleep(max(0.0, interval_s - elapsed))
    return latencies


def run_overload(
    url: str,
    payload: dict,
    probe_url: str,
    concurrency: int,
    duration_s: float,
    rate_per_s: float | None = None,
    processes: int = 4,
) -> dict:
    """Overload one route, with a ``/healthz`` probe every 0.5 s; refusal times are read at the server
    (Server-Timing) and at the client. No client honours Retry-After.

    ``rate_per_s`` None: ``concurrency`` clients that resend at once (a closed loop, the harshest load: it
    offers whatever the server can take, and by Little's law every answer waits about ``concurrency`` divided
    by the answer rate). Otherwise requests arrive at ``rate_per_s`` (open loop) on up to ``concurrency``
    connections.

    The clients are aiohttp sessions spread over ``processes`` processes: one httpx pool of hundreds of
    connections costs most of a core here, and its own queue then shows up as the server's latency."""
    body = json.dumps(payload).encode()
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    rate = None if rate_per_s is None else rate_per_s / processes
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes + 1, mp_context=context) as pool:
        # Every process up (interpreter started, modules imported) before the common start.
        list(pool.map(time.sleep, [0.2] * (processes + 1)))
        start_at = time.time() + 1.0
        probing = pool.submit(probe, probe_url, start_at, duration_s)
        parts = [
            pool.submit(_overload_part, url, body, n, rate, start_at, duration_s, seed) for seed, n in enumerate(shares)
        ]
        parts = [part.result() for part in parts]
        probes = probing.result()

    def merged(name: str) -> list[float]:
        return [value for part in parts for value in getattr(part, name)]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    served, refused_client, refused_server = merged("served"), merged("refused_client"), merged("refused_server")
    other: dict[int, int] = {}
    for part in parts:
        for status, count in part.other.items():
            other[status] = other.get(status, 0) + count
    return {
        "concurrency": concurrency,
        "rate_per_s": rate_per_s,
        "processes": processes,
        "served_rps": len(served) / duration_s,
        "served_p50_ms": pct(served, 50),
        "refused": len(refused_client),
        "refused_at_proxy": sum(part.refused_at_proxy for part in parts),
        "refused_server_p50_ms": pct(refused_server, 50),
        "refused_server_p99_ms": pct(refused_server, 99),
        "refused_client_p50_ms": pct(refused_client, 50),
        "refused_client_p99_ms": pct(refused_client, 99),
        "other_statuses": other,
        "healthz_p50_ms": pct(probes, 50),
        "healthz_max_ms": max(probes) if probes else float("nan"),
        "healthz_probes": len(probes),
        "healthz_answered": sum(1 for ms in probes if math.isfinite(ms)),
    }
