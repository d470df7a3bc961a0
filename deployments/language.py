"""The language-model deployment: chats and prompts in, streamed text out, with continuous batching.

Each replica holds one ``LanguageModel`` and one ``ContinuousBatcher`` over it, so the requests a replica
serves at once share forward passes. ``generate`` is a streaming method: the ingress calls it with
``handle.options(stream=True)`` and relays each ``GenerationChunk`` as it comes; when the caller goes away
(the HTTP client hung up), Serve cancels the call and the request leaves the batch at its next step.

Limits come from ``user_config`` and are checked before any work: prompt tokens, ``max_tokens``, and the
sequences decoded together. A request over a limit is refused with an error that names the parameter.

A request with a ``grammar`` (structured outputs, tool calls) gets a matcher from the replica's
``GrammarCompiler`` before it is accepted, so a grammar that cannot be enforced is refused (400) before any
token is generated; its tokens are then masked to the grammar inside the running batch.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contracts import GenerationChunk, GenerationRequest, TokenLogprob
from deployments.errors import InvalidInput, PromptTooLong
from deployments.llm import LanguageConfig, LanguageModel, TextStream
from deployments.runtime import ModelDeployment, configure_threads
from monitoring.metrics import LanguageMetrics

if TYPE_CHECKING:  # torch, transformers and llguidance: imported where a replica loads its model
    from deployments.generation import BatcherLimits, ContinuousBatcher, Logprob
    from deployments.grammar import GrammarCompiler

logger = logging.getLogger("ray.serve")

SEQUENCES_SAMPLE_S = 1.0
"""How often the running/waiting sequence gauges and the forward-pass counters are updated."""


class GenerationSettings(BaseModel):
    """``TextGenerator``'s ``user_config``: the model and the limits of what one replica takes on."""

    model_config = ConfigDict(extra="forbid")

    model: LanguageConfig = Field(default_factory=LanguageConfig)
    max_prompt_tokens: int = Field(2048, ge=16, le=1 << 20, description="Longest prompt, in tokens.")
    max_tokens: int = Field(512, ge=1, le=1 << 20, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none.")
    max_sequences: int = Field(8, ge=1, le=1024, description="Sequences decoded together; the rest wait.")
    max_batch_tokens: int = Field(
        256, ge=16, le=1 << 20, description="Tokens per forward pass: longer prompts are prefilled in chunks."
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> "GenerationSettings":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is over max_tokens ({self.max_tokens})")
        return self

    def batcher_limits(self) -> "BatcherLimits":
        from deployments.generation import BatcherLimits

        return BatcherLimits(
            max_sequences=self.max_sequences,
            max_sequence_tokens=self.max_prompt_tokens + self.max_tokens,
            max_batch_tokens=self.max_batch_tokens,
        )


@serve.deployment(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1}, user_config={})
class TextGenerator(ModelDeployment):
    """Serve deployment of a ``LanguageModel`` behind a ``ContinuousBatcher``."""

    settings_type: ClassVar = GenerationSettings
    task = "text-generation"

    def __init__(self, start_after: DeploymentHandle | None = None):
        super().__init__(start_after)
        self.model: LanguageModel | None = None
        self.batcher: "ContinuousBatcher | None" = None
        self.grammars: "GrammarCompiler | None" = None
        self.torch_threads = 0
        self.llm_metrics = LanguageMetrics(model="", version="")
        self._open_streams: dict[int, int] = {}  # id(batcher) -> streams reading from it
        self._tokens = 0  # tokens received by streams, for the batching counters
        self._sampler: asyncio.Task | None = None

    async def prepare(self, settings: GenerationSettings):
        from deployments.generation import ContinuousBatcher

        model, grammars = self.model, self.grammars
        if model is None or settings.model != model.config:
            model, grammars = await asyncio.to_thread(self._load, settings.model)
        room = settings.max_prompt_tokens + settings.max_tokens
        if room > model.context_tokens:
            raise ValueError(
                f"max_prompt_tokens + max_tokens ({room}) is over {model.name}'s context ({model.context_tokens})"
            )
        batcher = self.batcher
        if batcher is None or model is not self.model or settings.batcher_limits() != batcher.limits:
            batcher = await asyncio.to_thread(
                ContinuousBatcher,
                model.model,
                model.stop_token_ids,
                model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.stop_token_ids[0],
                settings.batcher_limits(),
            )
        return model, batcher, grammars

    def _load(self, config: LanguageConfig) -> "tuple[LanguageModel, GrammarCompiler]":
        from deployments.grammar import GrammarCompiler

        self.torch_threads = configure_threads(config.torch_threads)
        model = LanguageModel(config)
        vocab_size = int(model.model.config.vocab_size)
        return model, GrammarCompiler(model.tokenizer, vocab_size, model.stop_token_ids)

    def commit(self, prepared) -> None:
        model, batcher, self.grammars = prepared
        if model is not self.model:
            logger.info("Serving %s %s on %s with %d torch threads", model.name, model.version, model.device,
                        self.torch_threads)  # fmt: skip
            self.metrics.set_model(model.name, model.version)
            self.llm_metrics.set_model(model.name, model.version)
        previous, self.model = self.batcher, model
        if batcher is not previous:
            self.batcher = batcher
            if previous is not None:
                asyncio.get_running_loop().create_task(self._retire(previous))
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_batching())

    async def _retire(self, batcher: "ContinuousBatcher") -> None:
        """Stop a replaced batcher once the streams reading from it are done."""
        while self._open_streams.get(id(batcher)):
            await asyncio.sleep(0.5)
        await asyncio.to_thread(batcher.close)

    async def _sample_batching(self) -> None:
        """Keep the sequence gauges and the forward-pass counters current, for the replica's lifetime."""
        passes, tokens = 0, 0
        batcher = None
        while True:
            await asyncio.sleep(SEQUENCES_SAMPLE_S)
            try:
                if self.batcher is not batcher:
                    batcher, passes = self.batcher, self.batcher.forward_passes
                running, waiting = batcher.sequences()
                self.llm_metrics.set_sequences(running, waiting)
                now_passes, now_tokens = batcher.forward_passes, self._tokens
                if now_passes > passes:
                    self.metrics.batches.inc(now_passes - passes)
                if now_tokens > tokens:
                    self.metrics.batched_items.inc(now_tokens - tokens)
                passes, tokens = now_passes, now_tokens
            except Exception:  # noqa: BLE001 - metrics must not stop; the next round tries again
                logger.exception("Could not update the language model's batching metrics")

    def check_health(self) -> None:
        """Serve's health check: a replica whose decoding loop died is replaced rather than left to hang."""
        if self.batcher is not None and not self.batcher.alive():
            raise RuntimeError("the continuous-batching loop has stopped")

    def served(self) -> tuple[str, str]:
        return self.model.name, self.model.version

    def describe(self) -> dict:
        settings, model = self.settings, self.model
        running, waiting = self.batcher.sequences()
        return {
            "source": model.config.source,
            "device": str(model.device),
            "torch_threads": self.torch_threads,
            "details": {
                "context_tokens": model.context_tokens,
                "limits": settings.model_dump(exclude={"model"}),
                "sequences": {"running": running, "waiting": waiting},
                "forward_passes": self.batcher.forward_passes,
            },
            "drift": None,
        }

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            ids = self.model.chat_prompt(request.messages, request.tools)
            field = "messages"
        else:
            ids = self.model.text_prompt(request.prompt or "")
            field = "prompt"
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens, over the limit of {limit}", field=field)
        if not ids:
            raise InvalidInput("the prompt is empty", field=field)
        return ids

    def max_tokens(self, request: GenerationRequest) -> int:
        cap = self.settings.max_tokens
        if request.max_tokens is None:
            return self.settings.default_max_tokens
        if request.max_tokens > cap:
            raise InvalidInput(f"{request.max_tokens} is over the limit of {cap} tokens", field="max_tokens")
        return request.max_tokens

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The answer in pieces: first an empty chunk (accepted, prompt counted), then text as it is generated,
        the last one with the finish reason."""
        from deployments.generation import SamplingParams

        with self.counted():
            model, batcher, grammars = self.model, self.batcher, self.grammars
            prompt = await asyncio.to_thread(self.prompt_ids, request)
            params = SamplingParams(
                self.max_tokens(request), request.temperature, request.top_p, request.seed, request.logprobs
            )
            matcher = None
            if request.grammar is not None:
                matcher, built = await asyncio.to_thread(grammars.matcher, request.grammar)
                self.llm_metrics.observe_grammar(request.grammar.kind, built)
            text = TextStream(model.decode, request.stop or [])
            start = time.perf_counter()
            first = last = None
            reason = "cancelled"
            generated = 0

            def chunk(piece: str, finish: str | None = None, logprobs: list | None = None) -> GenerationChunk:
                scored = [_scored(grammars, p) for p in logprobs] if logprobs is not None else None
                return GenerationChunk(piece, len(prompt), generated, model.name, model.version, finish, scored)

            self._open_streams[id(batcher)] = self._open_streams.get(id(batcher), 0) + 1
            tokens = batcher.stream(prompt, params, matcher)
            try:
                yield chunk("", logprobs=[] if request.logprobs is not None else None)
                async for piece in tokens:
                    if piece.token_ids:
                        last = time.perf_counter() - start
                        first = first if first is not None else last
                        generated += len(piece.token_ids)
                        self._tokens += len(piece.token_ids)
                    new_text = text.add(piece.token_ids)
                    scored = (
                        None if piece.logprobs is None else list(zip(piece.token_ids, piece.logprobs, strict=False))
                    )
                    if text.stopped:
                        reason = "stop"
                        yield chunk(new_text, reason, scored)
                        break
                    if piece.finish_reason is not None:
                        reason = piece.finish_reason
                        yield chunk(new_text + text.finish(), reason, scored)
                        break
                    if new_text or scored:
                        yield chunk(new_text, logprobs=scored)
            except Exception:
                reason = "error"
                raise
            finally:
                with contextlib.suppress(Exception):
                    await tokens.aclose()
                self._open_streams[id(batcher)] -= 1
                self.llm_metrics.observe_finished(reason, len(prompt), generated, first, last)
                if matcher is not None and matcher.masks:
                    self.llm_metrics.observe_mask(matcher.mask_seconds / matcher.masks)


def _scored(grammars: "GrammarCompiler", scored: "tuple[int, Logprob]") -> TokenLogprob:
    """A generated token's log probability in the API's terms: the token as text and as bytes."""
    token_id, logprob = scored

    def spelled(token: int) -> tuple[str, list[int]]:
        raw = grammars.token_bytes(token)
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)

    text, raw = spelled(token_id)
    top = [(*spelled(token), value) for token, value in logprob.top]
    return TokenLogprob(text, raw, logprob.logprob, top)
