"""What one request used, gathered while it runs: language-model tokens, and personal data masked.

The ingress's audit middleware starts a ``Usage`` per request (``begin``); the dataplane records into it from
wherever the work happens (``record_tokens``), in the request's own task or in tasks it started, which see the
same object through the context variable. Outside a request (a unit test, a batch job) recording does nothing.
"""

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
    masked: Counter = field(default_factory=Counter)  # kind of personal data -> how many were masked
    masker: "Masker | None" = None  # set where the request's texts are to be masked

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


def masker() -> "Masker | None":
    """The masker of the request being served, if its texts are to be masked."""
    usage = _current.get()
    return usage.masker if usage is not None else None


def record_masked(counts: dict[str, int]) -> None:
    if (usage := _current.get()) is not None:
        usage.masked.update({kind: n for kind, n in counts.items() if n})
