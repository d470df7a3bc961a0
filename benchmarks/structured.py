"""Structured outputs and rerank: what a JSON schema costs a streamed answer, and rerank against its encoder.

* **Constrained against free, side by side.** At 1 and 8 closed-loop clients, streamed chat answers of the
  same prompts and the same ``max_tokens`` without and with a JSON schema, the two alternating at each
  client count so both see the same machine. The schema (a title and a story) lets an answer run to its
  ``max_tokens`` as a free one does, so both do the same number of forward passes per answer.
* **The mask per token**, in this process on one thread: the replica's ``GrammarCompiler`` and ``Matcher``
  fed, token by token, answers the model gave under the schema; and the time to build the matcher.
* **Rerank** at 32 closed-loop clients (one query, eight documents a request) against the same encoder in
  this process, one request at a time, one thread: the sentence encoder's work without HTTP or Ray.
"""

import asyncio
import json
import os
import statistics
import time

import httpx

from benchmarks import llm

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string"}},
    "required": ["title", "story"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
CLIENTS = (1, 8)
RERANK_CLIENTS = int(os.environ.get("BENCH_RERANK_CLIENTS", "32"))
RERANK_QUERIES = [
    "how do cats behave?",
    "what is the capital of France?",
    "how to bake bread at home",
    "why is the sky blue?",
]
RERANK_DOCUMENTS = [
    "Cats are independent animals that sleep much of the day and hunt at dusk.",
    "Paris is the capital and largest city of France.",
    "Bread is made from flour, water, yeast and salt, kneaded and baked.",
    "Sunlight is scattered by the air, and blue light is scattered most.",
    "The stock market closed higher on Tuesday after a volatile session.",
    "A bicycle has two wheels, pedals and a chain that drives the rear wheel.",
    "Dogs are loyal companions that need daily walks.",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
]


def rerank_body(i: int) -> dict:
    return {"model": "text", "query": RERANK_QUERIES[i % len(RERANK_QUERIES)], "documents": RERANK_DOCUMENTS}


def measure_cluster(base: str, log) -> dict:
    """Free and constrained streaming at each of ``CLIENTS``, then rerank at ``RERANK_CLIENTS``."""
    warm = {"model": "llm", "messages": llm.messages(0), "max_tokens": 4, "response_format": RESPONSE_FORMAT}
    httpx.post(base + llm.ROUTE, json=warm, timeout=300)
    rows = []
    for clients in CLIENTS:
        for kind, extra in (("free", {}), ("json_schema", {"response_format": RESPONSE_FORMAT})):
            row = asyncio.run(llm._load(base, clients, llm.DURATION_S, extra))
            row["format"] = kind
            log(f"structured c={clients} {kind}: {row['tokens_per_s']:.1f} tokens/s over {row['requests']} answers, "
                f"first token p50 {row['ttft_p50_s'] * 1000:.0f} ms, errors {row['errors']}")  # fmt: skip
            rows.append(row)
    rerank = asyncio.run(_rerank_load(base, RERANK_CLIENTS, llm.DURATION_S))
    log(f"rerank c={RERANK_CLIENTS}: {rerank['rps']:.1f} requests/s, p50 {rerank['p50_ms']:.0f} ms, "
        f"errors {rerank['errors']}")  # fmt: skip
    return {"rows": rows, "rerank": rerank}


async def _rerank_load(base: str, clients: int, duration_s: float) -> dict:
    latencies: list[float] = []
    errors: list = []

    async def client(http: httpx.AsyncClient, index: int, until: float) -> None:
        i = index
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                response = await http.post("/v1/rerank", json=rerank_body(i))
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            i += 1
            if response.status_code != 200:
                errors.append(response.status_code)
                continue
            latencies.append(time.perf_counter() - began)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http, c, start + duration_s) for c in range(clients)))
        seconds = time.monotonic() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / seconds,
        "p50_ms": llm.percentile(latencies, 0.5) * 1000,
        "p99_ms": llm.percentile(latencies, 0.99) * 1000,
    }


def measure_in_process(log) -> dict:
    """The grammar's costs and the encoder's rerank rate in this process, on one thread (as a replica runs)."""
    import torch

    torch.set_num_threads(1)
    return {"grammar": _grammar_costs(log), "rerank": _rerank_in_process(log)}


def _grammar_costs(log) -> dict:
    from deployments.contracts import Grammar
    from deployments.generation import BatcherLimits, ContinuousBatcher, SamplingParams
    from deployments.grammar import GrammarCompiler
    from deployments.llm import LanguageConfig, LanguageModel

    model = LanguageModel(LanguageConfig())
    compiler = GrammarCompiler(model.tokenizer, int(model.model.config.vocab_size), model.stop_token_ids)
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    start = time.perf_counter()
    compiler.matcher(grammar)
    build_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    for _ in range(100):
        compiler.matcher(grammar)
    cached_ms = (time.perf_counter() - start) * 10
    # Answers the model gives under the schema, then each token's mask timed on its own.
    batcher = ContinuousBatcher(model.model, model.stop_token_ids, model.stop_token_ids[0], BatcherLimits(8, 1536, 256))

    async def answer(i: int) -> list[int]:
        prompt = model.chat_prompt(llm.messages(i))
        tokens = []
        async for piece in batcher.stream(prompt, SamplingParams(llm.MAX_TOKENS, 0), compiler.matcher(grammar)[0]):
            tokens += piece.token_ids
        return tokens

    async def answers() -> list[list[int]]:
        return await asyncio.gather(*(answer(i) for i in range(len(llm.PROMPTS))))

    try:
        generated = asyncio.run(answers())
    finally:
        batcher.close()
    masks = []
    for tokens in generated:
        matcher, _ = compiler.matcher(grammar)
        for n in range(len(tokens) + 1):
            start = time.perf_counter()
            matcher.advance(tokens[:n])
            matcher.forbidden()
            masks.append((time.perf_counter() - start) * 1000)
    result = {
        "build_ms": build_ms,
        "cached_ms": cached_ms,
        "mask_ms_median": statistics.median(masks),
        "mask_ms_p99": llm.percentile(masks, 0.99),
        "tokens": len(masks),
    }
    log(
        f"grammar: built in {build_ms:.2f} ms, from the cache in {cached_ms:.3f} ms; mask and advance per token "
        f"median {result['mask_ms_median']:.3f} ms, p99 {result['mask_ms_p99']:.3f} ms over {len(masks)} tokens"
    )
    return result


def _rerank_in_process(log) -> dict:
    """One request at a time: the query's and the documents' embeddings, and their cosines, as the
    deployment's ``score`` computes them (``deployments.relevance``)."""
    from deployments.relevance import cosine_pairs
    from deployments.text import TextConfig, TextModel

    model = TextModel(TextConfig())
    model.embed([RERANK_QUERIES[0], *RERANK_DOCUMENTS])  # warm
    done, start = 0, time.monotonic()
    while time.monotonic() - start < llm.DURATION_S / 2:
        body = rerank_body(done)
        vectors = model.embed([body["query"], *body["documents"]])
        cosine_pairs(vectors[:1], vectors[1:])
        done += 1
    rps = done / (time.monotonic() - start)
    log(f"rerank in-process: {rps:.1f} requests/s (one at a time, one thread)")
    return {"requests": done, "rps": rps}


def combine(in_process: dict, cluster: dict) -> dict:
    return {"max_tokens": llm.MAX_TOKENS, "duration_s": llm.DURATION_S, **in_process, "cluster": cluster}


def headline(structured: dict) -> dict:
    rows = {(row["clients"], row["format"]): row for row in structured["cluster"]["rows"]}
    out = {}
    for clients in CLIENTS:
        free, bound = rows.get((clients, "free")), rows.get((clients, "json_schema"))
        if free and bound and free["tokens_per_s"]:
            out[f"cost_at_{clients}"] = 1 - bound["tokens_per_s"] / free["tokens_per_s"]
    out["rerank_over_in_process"] = structured["cluster"]["rerank"]["rps"] / structured["rerank"]["rps"]
    return out


def report(structured: dict) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    ratios = headline(structured)
    grammar, rerank = structured["grammar"], structured["cluster"]["rerank"]
    cost = ratios.get("cost_at_8")
    lines = [
        "## Structured outputs and rerank",
        "",
        f"Streamed chat answers of the language model's benchmark prompts, greedy, up to {structured['max_tokens']} "
        f"tokens, {structured['duration_s']:.0f} s per point, free and held to a JSON schema (a title and a story, "
        "so an answer can run as long as a free one), one after the other at each client count. The model closes "
        "its JSON sooner than it ends a free answer (tokens per answer below), so a constrained token carries "
        "more of its prompt's prefill: the comparison leans against the schema. Rerank: one query and eight "
        f"documents a request, {rerank['clients']} closed-loop clients, against the same encoder in-process.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    if cost is not None:
        lines.append(
            f"| a JSON schema costs at most 15% of tokens/s at 8 clients | {cost * 100:.1f}% | "
            f"{'met' if cost <= 0.15 else 'missed'} |"
        )
    lines += [
        "",
        "| clients | answer | answers | tokens per answer | tokens/s | time to first token p50 | p99 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in structured["cluster"]["rows"]:
        per_answer = row["tokens"] / row["requests"] if row["requests"] else 0.0
        lines.append(
            f"| {row['clients']} | {row['format']} | {row['requests']} | {per_answer:.0f} | "
            f"{row['tokens_per_s']:.1f} | {row['ttft_p50_s'] * 1000:.0f} ms | {row['ttft_p99_s'] * 1000:.0f} ms | "
            f"{row['errors']} |"
        )
    lines += [
        "",
        f"The grammar, in-process on one thread: built in {grammar['build_ms']:.2f} ms on a cache miss, "
        f"{grammar['cached_ms'] * 1000:.0f} µs from the cache; the token mask and the matcher's advance take "
        f"{grammar['mask_ms_median']:.3f} ms per token (median; p99 {grammar['mask_ms_p99']:.3f} ms, "
        f"{grammar['tokens']} tokens), on the decoding thread, for each constrained sequence of a forward pass.",
        "",
        f"Rerank: {rerank['rps']:.1f} requests/s through the cluster at {rerank['clients']} clients (p50 "
        f"{rerank['p50_ms']:.0f} ms, p99 {rerank['p99_ms']:.0f} ms, {rerank['errors']} errors) against "
        f"{structured['rerank']['rps']:.1f} in-process, one at a time: "
        f"{ratios['rerank_over_in_process']:.2f}×.",
    ]
    return lines
