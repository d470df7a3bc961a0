"""The language model under load: streaming clients against the cluster, and the same model in-process.

The in-process baseline runs ``LanguageModel`` one request at a time (greedy, ``model.generate`` with a
streamer that notes when the first token came), as a single-process server without batching would. The
same process then runs the deployment's ``ContinuousBatcher`` at 1 and 8 closed-loop clients, with no HTTP
or Ray: what continuous batching gives on this machine by itself. The
cluster is loaded on ``/v1/chat/completions`` with ``stream: true`` by 1, 4, 8 and 16 closed-loop clients;
each records its time to first token (the first content delta) and the tokens it was sent (``usage``).
Both generate greedily from the same prompts with the same ``max_tokens``, so they do the same work.
"""

import asyncio
import json
import os
import time

import httpx

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Describe a day in the life of a lighthouse keeper.",
    "Explain how a bicycle works to a child.",
    "Write a letter from a cat to its owner.",
    "Tell me about the history of bread.",
    "Describe a walk through a rainy city at night.",
    "Write a short play about two robots meeting.",
    "Explain why the sky is blue, in detail.",
]
MAX_TOKENS = int(os.environ.get("BENCH_LLM_MAX_TOKENS", "64"))
CLIENTS = [int(c) for c in os.environ.get("BENCH_LLM_CLIENTS", "1,4,8,16").split(",")]
DURATION_S = float(os.environ.get("BENCH_LLM_DURATION_S", "30"))
BASELINE_REQUESTS = int(os.environ.get("BENCH_LLM_BASELINE_REQUESTS", "8"))
ROUTE = "/v1/chat/completions"


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ttfts: list[float], tokens: int, seconds: float, requests: int, errors: int = 0) -> dict:
    return {
        "requests": requests,
        "errors": errors,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
    }


def measure_in_process() -> dict:
    """The model in this process, one greedy request at a time: tokens per second and time to first token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from deployments.llm import LanguageConfig, LanguageModel

    torch.set_num_threads(1)  # as a replica runs it
    model = LanguageModel(LanguageConfig())

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    prompts = [model.chat_prompt(messages(i)) for i in range(BASELINE_REQUESTS)]
    model.generate(prompts[0], max_new_tokens=2)  # warm up
    ttfts, tokens = [], 0
    start = time.perf_counter()
    for ids in prompts:
        streamer = FirstToken()
        began = time.perf_counter()
        generated, _ = model.generate(ids, MAX_TOKENS, streamer=streamer)
        ttfts.append(streamer.at - began)
        tokens += len(generated)
    result = summary(ttfts, tokens, time.perf_counter() - start, len(prompts))
    result["batched"] = [_batched_in_process(model, prompts, clients) for clients in IN_PROCESS_CLIENTS]
    del model
    return result


IN_PROCESS_CLIENTS = (1, 8)


def _batched_in_process(model, prompts: list[list[int]], clients: int) -> dict:
    """``clients`` closed-loop callers of one ``ContinuousBatcher`` (a replica's engine) in this process."""
    from deployments.generation import BatcherLimits, ContinuousBatcher, SamplingParams

    batcher = ContinuousBatcher(model.model, model.stop_token_ids, model.stop_token_ids[0], BatcherLimits(8, 1536, 256))
    ttfts: list[float] = []
    counts: list[int] = []

    async def caller(index: int, until: float) -> None:
        i = index
        while time.monotonic() < until:
            began, first, tokens = time.perf_counter(), None, 0
            async for piece in batcher.stream(prompts[i % len(prompts)], SamplingParams(MAX_TOKENS, 0)):
                if piece.token_ids and first is None:
                    first = time.perf_counter() - began
                tokens += len(piece.token_ids)
            i += len(PROMPTS) // 2 + 1
            ttfts.append(first)
            counts.append(tokens)

    async def run() -> float:
        start = time.monotonic()
        await asyncio.gather(*(caller(c, start + DURATION_S / 2) for c in range(clients)))
        return time.monotonic() - start

    try:
        seconds = asyncio.run(run())
    finally:
        batcher.close()
    result = summary([t for t in ttfts if t is not None], sum(counts), seconds, len(counts))
    result["clients"] = clients
    return result


async def _client(
    http: httpx.AsyncClient, index: int, until: float, ttfts: list, counts: list, errors: list, extra: dict
):
    i = index
    while time.monotonic() < until:
        body = {"model": "llm", "messages": messages(i), "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, **extra}  # fmt: skip
        i += len(PROMPTS) // 2 + 1
        began = time.perf_counter()
        first = None
        try:
            async with http.stream("POST", ROUTE, json=body) as response:
                if response.status_code != 200:
                    errors.append(response.status_code)
                    await response.aread()
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                        first = time.perf_counter() - began
                    if event.get("usage"):
                        counts.append(event["usage"]["completion_tokens"])
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
            continue
        if first is not None:
            ttfts.append(first)


async def _load(base: str, clients: int, duration_s: float, extra: dict | None = None) -> dict:
    """``clients`` closed-loop streaming clients for ``duration_s``; ``extra``: fields added to every body."""
    ttfts: list[float] = []
    counts: list[int] = []
    errors: list = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(
            *(_client(http, c, start + duration_s, ttfts, counts, errors, extra or {}) for c in range(clients))
        )
        seconds = time.monotonic() - start  # until the last answer begun in time is done
    result = summary(ttfts, sum(counts), seconds, len(counts), len(errors))
    result["clients"] = clients
    return result


def measure_cluster(base: str, log) -> list[dict]:
    """Closed-loop streaming clients at each of ``CLIENTS``, after one warm-up request."""
    httpx.post(base + ROUTE, json={"model": "llm", "messages": messages(0), "max_tokens": 4}, timeout=300)
    rows = []
    for clients in CLIENTS:
        row = asyncio.run(_load(base, clients, DURATION_S))
        log(
            f"llm c={clients}: {row['tokens_per_s']:.1f} tokens/s over {row['requests']} answers, time to first "
            f"token p50 {row['ttft_p50_s'] * 1000:.0f} ms p99 {row['ttft_p99_s'] * 1000:.0f} ms, "
            f"errors {row['errors']}"
        )
        rows.append(row)
    return rows


def headline(llm: dict) -> dict:
    """The ratios the issue sets targets for: at 8 clients against 1, and against the in-process baseline."""
    by_clients = {row["clients"]: row for row in llm["cluster"]}
    one, eight = by_clients.get(1), by_clients.get(8)
    out = {}
    if one and eight:
        out["tokens_per_s_8_over_1"] = eight["tokens_per_s"] / one["tokens_per_s"]
        out["ttft_p50_8_over_1"] = eight["ttft_p50_s"] / one["ttft_p50_s"]
    if eight:
        out["tokens_per_s_8_over_in_process"] = eight["tokens_per_s"] / llm["in_process"]["tokens_per_s"]
    if one:
        out["ttft_p50_1_over_in_process"] = one["ttft_p50_s"] / llm["in_process"]["ttft_p50_s"]
    return out


def report(llm: dict) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    ratios = headline(llm)
    base = llm["in_process"]
    lines = [
        "## Language model",
        "",
        f"SmolLM2-135M-Instruct, greedy, up to {llm['max_tokens']} new tokens per answer, streamed from "
        f"`/v1/chat/completions` to closed-loop clients for {llm['duration_s']:.0f} s per point (two replicas "
        "with continuous batching, as shipped). The baseline is the same model in one process, one request "
        "at a time, no HTTP.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    if "tokens_per_s_8_over_1" in ratios:
        lines += [
            f"| tokens/s at 8 clients ≥ 3× at 1 client | {ratios['tokens_per_s_8_over_1']:.2f}× | "
            f"{'met' if ratios['tokens_per_s_8_over_1'] >= 3 else 'missed'} |",
            f"| time to first token p50 at 8 clients ≤ 2× at 1 client | {ratios['ttft_p50_8_over_1']:.2f}× | "
            f"{'met' if ratios['ttft_p50_8_over_1'] <= 2 else 'missed'} |",
        ]
    lines += [
        "",
        "| setup | clients | answers | tokens/s | time to first token p50 | p99 | errors |",
        "|---|---|---|---|---|---|---|",
        f"| in-process, one at a time | 1 | {base['requests']} | {base['tokens_per_s']:.1f} | "
        f"{base['ttft_p50_s'] * 1000:.0f} ms | {base['ttft_p99_s'] * 1000:.0f} ms | 0 |",
    ]
    for row in base.get("batched", []):
        lines.append(
            f"| in-process, continuous batching (one engine, no HTTP) | {row['clients']} | {row['requests']} | "
            f"{row['tokens_per_s']:.1f} | {row['ttft_p50_s'] * 1000:.0f} ms | {row['ttft_p99_s'] * 1000:.0f} ms | 0 |"
        )
    for row in llm["cluster"]:
        lines.append(
            f"| cluster, streaming | {row['clients']} | {row['requests']} | {row['tokens_per_s']:.1f} | "
            f"{row['ttft_p50_s'] * 1000:.0f} ms | {row['ttft_p99_s'] * 1000:.0f} ms | {row['errors']} |"
        )
    if "tokens_per_s_8_over_in_process" in ratios:
        lines += [
            "",
            f"At 8 clients the cluster streams {ratios['tokens_per_s_8_over_in_process']:.2f}× the in-process "
            f"baseline's tokens per second; one streaming client's first token takes "
            f"{ratios['ttft_p50_1_over_in_process']:.2f}× the in-process time (HTTP, proxy, ingress and the "
            "streaming hop).",
        ]
    return lines
