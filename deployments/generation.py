"""Continuous batching of one language model: transformers' manager, driven from asyncio.

transformers 5 ships the scheduler, the paged KV cache and the decoding loop
(``model.init_continuous_batching``): requests join the running batch between
decoding steps and leave it when they finish, so concurrent requests share
forward passes. This module adds what a server needs around it:

* an async stream of new tokens per request (``stream``), cancelled in the
  manager when the consumer stops early (a client that hung up frees its slot);
* sampling that is reproducible per request. The manager samples with one
  global random generator, so the same ``seed`` would give different answers
  depending on what else is in the batch. Here the last logits processor picks
  each row's token itself, by the exponential race (Gumbel-max) with noise
  drawn from a generator seeded by the request's seed and the token's position,
  and leaves only that token for the manager's argmax. Temperature and top-p
  are the library's own per-request processors. Temperature 0 (below 1e-5) is greedy.
* constrained decoding: a request with a grammar (``deployments.grammar``) has
  every token outside it masked out of its row, first, before temperature and
  top-p, inside the running batch; other rows are not touched.
* log probabilities, from the distribution each token was drawn from: after
  the grammar's mask, temperature and top-p, as the last processor sees it.

Each processor keeps what a request needs (its matcher, its log probabilities)
in a table keyed by a small integer the request carries as a processor argument:
the library passes only integers and floats through its per-request tensors.
"""

import asyncio
import contextlib
import itertools
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

GREEDY = -1
"""The ``seed`` processor argument of a greedy request."""
GREEDY_BELOW = 1e-5
"""Temperatures under this are greedy (vLLM's threshold): the logits divided by a temperature of 1e-233 are
infinite, and a sample from them is garbage."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random one
    logprobs: int | None = None  # None: none; k: each token's and the k most likely

    def processor_kwargs(self) -> dict:
        if self.temperature < GREEDY_BELOW:
            return {"temperature": 1.0, "top_p": 1.0, "seed": GREEDY}
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "seed": seed % (1 << 63)}


@dataclass(frozen=True)
class Logprob:
    """A chosen token's log probability and the ``top`` most likely tokens' ``(token_id, logprob)``."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Tokens:
    """What a request generated since the last ``Tokens``, and why it ended (``None`` while it goes on)."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (end of turn) or "length" (max_tokens)
    logprobs: list[Logprob] | None = None  # one per token, when asked for


class Slots:
    """Per-request state a processor keeps, under small positive integers the requests carry (0: none)."""

    def __init__(self):
        self._next = itertools.count()
        self._items: dict[int, object] = {}

    def add(self, item) -> int:
        slot = next(self._next) % 0x7FFFFFFF + 1  # an int32 the library's tensors carry
        self._items[slot] = item
        return slot

    def get(self, slot: int):
        return self._items.get(slot)

    def remove(self, slot: int) -> None:
        self._items.pop(slot, None)


class GrammarMask(ContinuousBatchingLogitsProcessor):
    """Masks out of each constrained row the tokens its grammar does not allow next.

    Before each step, each constrained request's matcher is told the tokens generated since the last step
    and computes its mask (``prepare_tensor_args``, on the decoding thread); the step then fills the rows'
    forbidden tokens with -inf. Rows without a grammar are left as they are.
    """

    supported_kwargs = {"grammar": int}
    ignored_kwargs = ()

    def __init__(self):
        self.matchers = Slots()
        self._forbidden: dict[int, torch.Tensor] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        slots, forbidden = [], {}
        for request in requests_with_new_token:
            slot = request.state.logit_processor_kwargs.get("grammar", 0)
            matcher = self.matchers.get(slot) if slot else None
            if matcher is None:
                slots.append(0)
                continue
            matcher.advance(request.state.generated_tokens)
            forbidden[slot] = matcher.forbidden()
            slots.append(slot)
        self._forbidden = forbidden
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        slots = tensor_arg[: scores.size(0)].tolist()
        for row, slot in enumerate(slots):
            forbidden = self._forbidden.get(slot) if slot else None
            if forbidden is not None:
                scores[row, : forbidden.numel()].masked_fill_(forbidden.to(scores.device), float("-inf"))
        return scores


class SeededChoice(ContinuousBatchingLogitsProcessor):
    """Picks each row's next token: argmax for greedy requests, else a sample drawn with the request's own
    generator (seed and position), so the same seed gives the same tokens whatever shares the batch.

    Sampling is the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per token is a draw from ``p``.
    The returned scores keep only the chosen token, which the manager's argmax then takes.

    Where the request asks for log probabilities (its ``logprobs`` argument, a slot in ``records``: a list the
    request's stream reads), the row's log-softmax gives the chosen token's and the most likely ones': the
    distribution the token was drawn from (after the grammar's mask, temperature and top-p).
    """

    supported_kwargs = {"seed": int, "logprobs": int}
    ignored_kwargs = ()

    def __init__(self):
        self.records = Slots()  # slot -> (top k, list of Logprob)
        self._rows: list[int] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        seeds, rows = [], []
        for request in requests_with_new_token:
            kwargs = request.state.logit_processor_kwargs
            seed = kwargs.get("seed", GREEDY)
            if seed != GREEDY:  # one generator state per (request, position), in int32's positive range
                seed = hash((seed, len(request.state.generated_tokens))) & 0x7FFFFFFF
            seeds.append(seed)
            rows.append(kwargs.get("logprobs", 0))
        self._rows = rows
        return torch.tensor(seeds, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        seeds = tensor_arg[: scores.size(0)].tolist()
        chosen = torch.empty(len(seeds), dtype=torch.long)
        for row, seed in enumerate(seeds):
            if seed == GREEDY:
                chosen[row] = scores[row].argmax()
                continue
            generator = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.empty(scores.size(1)).exponential_(generator=generator).to(scores.device)
            chosen[row] = (scores[row].softmax(dim=-1) / noise).argmax()
        for row, slot in enumerate(self._rows[: len(seeds)]):
            record = self.records.get(slot) if slot else None
            if record is not None:
                record[1].append(_logprob(scores[row], int(chosen[row]), record[0]))
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(1, chosen.to(scores.device).unsqueeze(1), 0.0)
        return picked


def _logprob(row: torch.Tensor, token: int, top: int) -> Logprob:
    logprobs = row.float().log_softmax(dim=-1)
    best = []
    if top:
        values, ids = logprobs.topk(top)
        best = [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True) if v > float("-inf")]
    return Logprob(float(logprobs[token]), best)


class SamplingProcessors(ContinuousBatchingLogitsProcessorList):
    """A request's grammar mask, then per-request temperature and top-p (transformers' processors), then
    ``SeededChoice``."""

    def __init__(self):
        self.grammar = GrammarMask()
        self.choice = SeededChoice()
        super().__init__(
            LogitsProcessorList(
                [
                    self.grammar,
                    ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0)),
                    ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(1.0)),
                    self.choice,
                ]
            )
        )
        self.tensors_required = 4  # one argument row per processor above


@dataclass(frozen=True)
class BatcherLimits:
    max_sequences: int  # decoded together in one forward pass
    max_sequence_tokens: int  # prompt + answer, for sizing the KV cache
    max_batch_tokens: int  # tokens per forward pass (long prompts are prefilled in chunks of this)
    page_size: int = 64


class ContinuousBatcher:
    """One model's continuous-batching manager, for callers on one asyncio loop."""

    def __init__(self, model, stop_token_ids: list[int], pad_token_id: int, limits: BatcherLimits):
        self.limits = limits
        self.stop_token_ids = set(stop_token_ids)
        pages = -(-limits.max_sequences * limits.max_sequence_tokens // limits.page_size)
        generation = GenerationConfig(
            do_sample=False,  # SeededChoice has chosen each token; the manager's argmax takes it
            max_new_tokens=limits.max_sequence_tokens,
            eos_token_id=stop_token_ids,
            pad_token_id=pad_token_id,
        )
        batching = ContinuousBatchingConfig(
            page_size=limits.page_size,
            num_blocks=pages,
            max_batch_tokens=limits.max_batch_tokens,
            max_requests_per_batch=limits.max_sequences,
            allow_block_sharing=False,
            # A grammar's mask for a step needs the token the step before chose: no double-buffering (which
            # prepares a step while the one before is still on the GPU).
            use_async_batching=False,
        )
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
        self.processors = SamplingProcessors()
        self.manager.logit_processor = self.processors
        self.manager.start()

    def close(self) -> None:
        self.manager.stop(block=True)

    def alive(self) -> bool:
        """Whether the manager's decoding thread still runs (it stops for good on an error it cannot handle)."""
        return self.manager.is_running()

    @property
    def forward_passes(self) -> int:
        """Decoding steps (forward passes) run so far."""
        return int(getattr(self.manager, "current_batch", 0) or 0)

    def sequences(self) -> tuple[int, int]:
        """Sequences being decoded and sequences waiting for a slot, now."""
        processor = getattr(self.manager, "batch_processor", None)
        if processor is None:
            return 0, 0
        scheduler = processor.scheduler
        return len(scheduler.active_requests), len(scheduler.waiting_requests)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, matcher=None) -> AsyncIterator[Tokens]:
        """New tokens as they are generated; the last ``Tokens`` has the finish reason.

        ``matcher`` (``deployments.grammar.Matcher``) constrains the tokens to its grammar. Leaving the
        iteration early (the consumer was cancelled or stopped at a stop string) cancels the request in the
        manager, which frees its sequence slot and KV cache at its next step.
        """
        request_id = uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        kwargs = params.processor_kwargs()
        grammar = record = 0
        if matcher is not None:
            grammar = kwargs["grammar"] = self.processors.grammar.matchers.add(matcher)
        logprobs: list[Logprob] = []
        if params.logprobs is not None:
            record = kwargs["logprobs"] = self.processors.choice.records.add((params.logprobs, logprobs))
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        try:
            accepted = await asyncio.to_thread(
                self.manager.add_request,
                prompt_ids,
                request_id=request_id,
                max_new_tokens=params.max_tokens,
                streaming=True,
                **kwargs,
            )
            if accepted is None:
                raise RuntimeError("the language model's batching loop is not accepting requests")
            results = self._results(request_id, outputs, logprobs if record else None)
            async with contextlib.aclosing(results):  # leaving early cancels the request now, not at collection
                async for tokens in results:
                    yield tokens
        finally:
            self.processors.grammar.matchers.remove(grammar)
            self.processors.choice.records.remove(record)

    async def _results(self, request_id: str, outputs: asyncio.Queue, logprobs: list | None) -> AsyncIterator[Tokens]:
        finished = False
        sent = 0
        try:
            while not finished:
                output = await outputs.get()
                if output.error:
                    finished = True
                    raise RuntimeError(f"generation failed: {output.error}")
                tokens = list(output.generated_tokens)
                finished = output.is_finished()
                reason = None
                if finished:
                    reason = "length"
                    if tokens and tokens[-1] in self.stop_token_ids:
                        tokens, reason = tokens[:-1], "stop"
                if len(tokens) > sent or reason:
                    chosen = logprobs[sent : len(tokens)] if logprobs is not None else None
                    yield Tokens(tokens[sent:], reason, chosen)
                    sent = len(tokens)
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    self.manager.cancel_request(request_id)
