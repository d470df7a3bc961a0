"""Constrained decoding: a request's grammar as the set of tokens it allows next, step by step.

The engine is llguidance (``llguidance==1.9.1``), chosen over xgrammar by measurement on one thread
(``benchmarks/grammar_engines.py``, benchmarks/NOTES.md "Constrained decoding"): masking costs about the same
per token with SmolLM2's 49,152 tokens, but llguidance builds a matcher in about 1 ms where xgrammar
compiles for about 5 ms, and a hostile schema (long patterns, many times over) took xgrammar 252 s
to compile and llguidance 5 ms. llguidance computes masks lazily, with a fuel limit on each step's work, so
no schema a client can send holds a replica.

A JSON schema's objects are closed (``json_schema.closed``): without ``additionalProperties`` they hold only the
properties they name, so a small model cannot pad an answer with keys it invents.

``GrammarCompiler`` turns a ``contracts.Grammar`` into a ready ``Matcher``: the llguidance matcher is built
once per grammar (an LRU cache keyed by the grammar's kind and text) and each request gets a copy, which
costs microseconds. A grammar that cannot be used is an ``InvalidInput`` naming the request field, raised
before any token is generated. Its message says what kind of problem it is in this module's words, never
the engine's text, which quotes the schema (no payload is echoed into an error).
"""

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
import torch

from deployments import json_schema
from deployments.contracts import Grammar
from deployments.errors import InvalidInput

CACHE_SIZE = 128
"""Built matchers kept per replica, most recently used first."""

JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON (``{"a":1}``): no whitespace for a small model to ramble in between tokens."""

LIMITS = {"verbose_errors": False}
"""llguidance's limits at their defaults (fuel per step, grammar size, lexer states), without parser state in
error messages."""

# What the engine said, as a kind of problem (its own text quotes the grammar, so it is never passed on).
_REASONS = (
    (re.compile(r"invalid type", re.I), "it names a type JSON Schema does not have"),
    (re.compile(r"regex|look-around|lookaround", re.I),
     "it has a pattern this engine cannot use (look-around and back-references are not supported)"),
    (re.compile(r"pointer|\$ref|reference", re.I), "it has a $ref that points to nothing in the schema"),
    (re.compile(r"unsatisfiable", re.I), "no value can satisfy it (for example minItems over maxItems)"),
    (re.compile(r"unimplemented|unsupported|not supported|unknown", re.I),
     "it uses a keyword this engine cannot enforce"),
    (re.compile(r"limit|too (large|many|complex)|fuel", re.I), "it is too large or complex to enforce"),
)  # fmt: skip


def reason(engine_error: str) -> str:
    """Why a grammar was refused, in this module's words."""
    for pattern, words in _REASONS:
        if pattern.search(engine_error):
            return words
    return "this engine cannot enforce it"


@dataclass
class Compiled:
    """A built matcher, never advanced: the template each request's copy is taken from."""

    matcher: llguidance.LLMatcher
    seconds: float


class Matcher:
    """One request's grammar state: advanced by the tokens it generated, asked which tokens may come next."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_token_ids: list[int]):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._stop = torch.tensor(stop_token_ids, dtype=torch.long)
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.consumed = 0
        self.failed = False
        self.mask_seconds = 0.0
        self.masks = 0

    def advance(self, generated: list[int]) -> None:
        """Tell the matcher the tokens generated since the last call (``generated`` is all of them)."""
        new = generated[self.consumed :]
        self.consumed = len(generated)
        if new and not self.failed:
            self._matcher.consume_tokens(new)
            self.failed = self._matcher.is_error()

    def forbidden(self) -> torch.Tensor:
        """A boolean row over the vocabulary: the tokens that may not come next. Once the grammar is complete
        (or, should it fail, at once) only the end of the answer is allowed."""
        start = time.perf_counter()
        if self.failed or self._matcher.is_stopped():
            forbidden = torch.ones(self._vocab_size, dtype=torch.bool)
            forbidden[self._stop] = False
        else:
            self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little", count=self._vocab_size)
            forbidden = torch.from_numpy(allowed == 0)
        self.mask_seconds += time.perf_counter() - start
        self.masks += 1
        return forbidden


class GrammarCompiler:
    """Grammars to matchers for one tokenizer, with a cache of built matchers."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=self.stop_token_ids)
        self._limits = llguidance.LLParserLimits(**LIMITS)
        self._cache: OrderedDict[tuple[str, str], Compiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def token_bytes(self, token_id: int) -> bytes:
        """A token's bytes (a token can be part of a character)."""
        return self.tokenizer.decode_bytes([token_id])

    def matcher(self, grammar: Grammar) -> tuple[Matcher, float | None]:
        """A fresh matcher for ``grammar``, and the seconds it took to build (``None``: from the cache)."""
        key = (grammar.kind, grammar.source)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        built = None
        if compiled is None:
            compiled = self._compile(grammar)
            built = compiled.seconds
            with self._lock:
                self.misses += 1
                self._cache[key] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Matcher(compiled.matcher.deep_copy(), self.vocab_size, self.stop_token_ids), built

    def _compile(self, grammar: Grammar) -> Compiled:
        start = time.perf_counter()
        try:
            text = self._grammar_text(grammar)
        except ValueError as exc:
            raise InvalidInput(
                f"{_what(grammar)} cannot be enforced: {reason(str(exc))}", field=grammar.field
            ) from None
        matcher = llguidance.LLMatcher(self.tokenizer, text, limits=self._limits, log_level=0)
        if matcher.is_error():
            raise InvalidInput(
                f"{_what(grammar)} cannot be enforced: {reason(matcher.get_error())}", field=grammar.field
            )
        return Compiled(matcher, time.perf_counter() - start)

    @staticmethod
    def _grammar_text(grammar: Grammar) -> str:
        if grammar.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if grammar.kind == "json_schema":
            try:
                schema = json.loads(grammar.source)
            except ValueError:
                raise ValueError("not JSON") from None
            return llguidance.LLMatcher.grammar_from_json_schema(json_schema.closed(schema), defaults=JSON_OPTIONS)
        if grammar.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(grammar.source)
        if grammar.kind == "lark":
            return grammar.source
        raise InvalidInput(f"unknown grammar kind {grammar.kind!r}", field=grammar.field)


def _what(grammar: Grammar) -> str:
    return {"json_schema": "the schema", "regex": "the pattern", "lark": "the grammar"}.get(grammar.kind, "it")
