"""The image-to-words path in ``make bench``: ``POST /v1/multimodal/describe`` at 1 and 8 closed-loop clients.

Each request sends one of four real images (two photographs without text, a scanned page, rendered words) and
gets a description written by the language model from what vision and OCR found. The response's ``seconds``
say how long the ingress waited for each model: vision and OCR run in parallel, then the language model; the
rest of a request's latency is decoding the upload, HTTP, the proxy and the ingress. Their means, as shares of
the mean latency, are in the report.

Knobs: ``BENCH_DESCRIBE_DURATION_S`` (per point, default 30), ``BENCH_DESCRIBE_CLIENTS`` (default ``1,8``).
"""

import asyncio
import base64
import io
import os
import time

import httpx
import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageFont

ROUTE = "/v1/multimodal/describe"
DURATION_S = float(os.environ.get("BENCH_DESCRIBE_DURATION_S", "30"))
CLIENTS = [int(c) for c in os.environ.get("BENCH_DESCRIBE_CLIENTS", "1,8").split(",")]
MODELS = ("vision", "ocr", "llm")


def _jpeg(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def images() -> list[str]:
    """Base64 JPEGs: chelsea, coffee, scikit-image's scanned page, and three words in a large font."""
    words = Image.new("RGB", (720, 200), "white")
    ImageDraw.Draw(words).text((30, 50), "OPEN SESAME", fill="black", font=ImageFont.load_default(size=72))
    return [_jpeg(skimage.data.chelsea()), _jpeg(skimage.data.coffee()), _jpeg(skimage.data.page()),
            _jpeg(np.asarray(words))]  # fmt: skip


async def _client(http: httpx.AsyncClient, index: int, until: float, pictures: list[str], rows: list, errors: list):
    n = index
    while time.monotonic() < until:
        start = time.perf_counter()
        response = await http.post(ROUTE, json={"image": pictures[n % len(pictures)]})
        n += 1
        if response.status_code != 200:
            errors.append(response.status_code)
            continue
        rows.append((time.perf_counter() - start, response.json()["seconds"]))


async def _load(base: str, clients: int, duration_s: float) -> dict:
    pictures = images()
    rows: list = []
    errors: list = []
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.monotonic()
        await asyncio.gather(*(_client(http, c, start + duration_s, pictures, rows, errors) for c in range(clients)))
        seconds = time.monotonic() - start
    latencies = np.array([latency for latency, _ in rows]) if rows else np.array([np.nan])
    mean = float(latencies.mean())
    waited = {model: float(np.mean([parts[model] for _, parts in rows])) if rows else float("nan") for model in MODELS}
    return {
        "clients": clients,
        "requests": len(rows),
        "errors": len(errors),
        "throughput_rps": len(rows) / seconds,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "mean_s": mean,
        "model_s": waited,
        "share": {model: value / mean for model, value in waited.items()},
    }


def measure_cluster(base: str, log) -> list[dict]:
    """Closed-loop clients at each of ``CLIENTS``, after one warm-up request per image."""
    for picture in images():
        httpx.post(base + ROUTE, json={"image": picture}, timeout=300)
    rows = []
    for clients in CLIENTS:
        row = asyncio.run(_load(base, clients, DURATION_S))
        log(
            f"describe c={clients}: {row['throughput_rps']:.2f} req/s, p50 {row['p50_s']:.2f} s p99 "
            f"{row['p99_s']:.2f} s; waiting for vision {row['share']['vision']:.0%}, ocr {row['share']['ocr']:.0%}, "
            f"llm {row['share']['llm']:.0%} of the mean latency; errors {row['errors']}"
        )
        rows.append(row)
    return rows


def report(rows: list[dict], duration_s: float) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    lines = [
        "## Image to words: grounded descriptions",
        "",
        f"`POST {ROUTE}` with closed-loop clients for {duration_s:.0f} s per point, cycling through four "
        "images (chelsea, coffee, scikit-image's scanned page, rendered words). Vision and OCR run in parallel, "
        "then the language model writes the description; the shares are the mean time the ingress waited for "
        "each model over the mean latency (vision's and OCR's overlap; the rest is decoding, HTTP, proxy and "
        "ingress).",
        "",
        "| clients | answers | req/s | p50 | p99 | vision | OCR | language model | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        model_s, share = row["model_s"], row["share"]
        lines.append(
            f"| {row['clients']} | {row['requests']} | {row['throughput_rps']:.2f} | {row['p50_s']:.2f} s | "
            f"{row['p99_s']:.2f} s | "
            + " | ".join(f"{model_s[m]:.2f} s ({share[m]:.0%})" for m in MODELS)
            + f" | {row['errors']} |"
        )
    return lines
