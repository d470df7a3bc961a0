"""Under overload, excess requests are refused fast, the ingress stays up, and the service recovers.

Traffic goes to loopback only, in one bounded burst.
"""

import asyncio
import statistics
import time

import httpx

from tests.conftest import b64

BURST = 320  # about ten times what the vision route sustains on two cores


async def _burst(url: str, payload: dict) -> tuple[list[tuple[int, float, httpx.Headers]], int]:
    limits = httpx.Limits(max_connections=BURST + 8, max_keepalive_connections=BURST + 8)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one() -> tuple[int, float, httpx.Headers]:
            start = time.monotonic()
            response = await client.post("/v1/vision/classify", json=payload)
            return response.status_code, time.monotonic() - start, response.headers

        async def health_during_burst() -> int:
            await asyncio.sleep(0.5)
            return (await client.get("/healthz")).status_code

        *results, health = await asyncio.gather(*(one() for _ in range(BURST)), health_during_burst())
        return results, health


def test_overload_is_refused_fast_and_the_service_recovers(app_url, client, chelsea_jpeg, coffee_jpeg):
    results, health = asyncio.run(_burst(app_url, {"image": b64(chelsea_jpeg), "top_k": 1}))
    statuses = [status for status, _, _ in results]

    assert set(statuses) <= {200, 503}, f"unexpected statuses: {sorted(set(statuses))}"
    accepted = [latency for status, latency, _ in results if status == 200]
    refused = [(latency, headers) for status, latency, headers in results if status == 503]
    assert accepted, "nothing was served during the burst"
    assert refused, "the burst never overflowed the queues; backpressure was not exercised"
    assert all(headers.get("retry-after") == "1" for _, headers in refused)
    # Refusals come straight back instead of waiting for a model.
    assert statistics.median(latency for latency, _ in refused) < statistics.median(accepted)

    assert health == 200, "the ingress did not answer /healthz during the burst"
    recovered = client.post("/v1/vision/classify", json={"image": b64(coffee_jpeg)})
    assert recovered.status_code == 200
    assert recovered.json()["labels"][0]["label"] == "espresso"
