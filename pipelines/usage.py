"""What one request used, gathered while it runs: language-model tokens, and personal data masked.

The ingress's audit middleware starts a ``Usage`` per request (``begin``); the dataplane records into it from
wherever the work happens (``record_tokens``), in the request's own task or in tasks it started, which see the
same object through the context variable. Outside a request (a unit test, a batch job) recording does nothing.
"""

import asyncio
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.privacy import Masker


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds: float = 0.0  # heard (transcribed) and spoken (synthesised)
    masked: Counter = field(default_factory=Counter)  # kind of personal data -> how many were masked
    masker: "Masker | None" = None  # set where the request's texts are to be masked
    models: set = field(default_factory=set)  # models the request's body asked for beyond its route's own
    caller: str | None = None  # who is calling, for a rollout's sticky split: the API key id, or X-Maas-Caller
    pin: str | None = None  # the variant the request pinned (X-Maas-Variant), allowed by access control
    variants: dict = field(default_factory=dict)  # model -> the variant that answered, where it has a rollout

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_current: ContextVar[Usage | None] = ContextVar("maas_usage", default=None)


def begin() -> Usage:
    usage = Usage()
    _current.set(usage)
    return usage


def current() -> Usage | None:
    return _current.get()


def record_tokens(prompt_tokens: int, completion_tokens: int) -> None:
    """One language-model answer's tokens (its last chunk's counts)."""
    if (usage := _current.get()) is not None:
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens


def record_audio(seconds: float) -> None:
    """Seconds of audio a request had heard or spoken."""
    if (usage := _current.get()) is not None:
        usage.audio_seconds += seconds


def masker() -> "Masker | None":
    """The masker of the request being served, if its texts are to be masked."""
    usage = _current.get()
    return usage.masker if usage is not None else None


def record_masked(counts: dict[str, int]) -> None:
    if (usage := _current.get()) is not None:
        usage.masked.update({kind: n for kind, n in counts.items() if n})


async def private(texts: list[str]) -> list[str]:
    """The texts with personal data masked, where the request asked for masking (counted in its usage)."""
    found = masker()
    if found is None:
        return texts
    masked, counts = await asyncio.to_thread(found.mask_all, texts)  # the NER model takes milliseconds a text
    record_masked(counts)
    return masked
