"""API keys: who may call the service, which route families and models, and how often.

A key is a random secret given to a client once (``python -m api.keys add``); the service keeps only its
SHA-256. Keys are 256-bit random tokens, so a plain SHA-256 is as safe as a slow password hash would be (the
approach of GitHub's and Stripe's tokens), and checking one costs microseconds. A presented key is hashed and
compared against every stored hash with ``hmac.compare_digest``, without stopping at a match, so the time a
check takes says nothing about which stored hash is near it.

Keys come from the ingress's ``user_config`` (``security.api_keys``, hashes inline) and from a YAML file
(``security.api_keys_file``, e.g. a mounted Kubernetes Secret), which ``KeyFile`` re-reads when it changes:
adding or revoking a key needs no restart either way.

The file::

    keys:
      - id: team-a                 # in the audit log and metrics; never the key
        sha256: 2c26b46b68ffc6...  # sha256 of the key, hex
        routes: [v1, openai]       # route families: v1, openai, v2 (default: all)
        models: [vision, text]     # models: vision, text, fusion, ocr, llm, asr, tts (default: all)
        rate_limit: {requests_per_s: 5, burst: 10, tokens_per_minute: 20000, audio_seconds_per_minute: 600}
"""

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger("ray.serve")

FAMILIES = ("v1", "openai", "v2", "admin")
"""Route families a key can be scoped to: this service's ``/v1`` API, the OpenAI-compatible API, the OIP (``/v2``),
and the operator's routes (``/v1/admin``, and pinning a rollout's variant with ``X-Maas-Variant``)."""
MODELS = ("vision", "text", "fusion", "ocr", "llm", "asr", "tts")
"""Models a key can be scoped to (GET /v1/models lists them)."""
ALL = "*"
PREFIX = "maas_"
"""Every key starts with this, so secret scanners and people can tell what it is."""
MAX_KEYS = 1000
"""A bound on a key file's entries: every entry is compared on every request, and each id is a metrics label."""


class RateLimit(BaseModel):
    """A key's limits: a token bucket of requests, and one of language-model tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_s: float = Field(gt=0, le=100_000, description="Sustained requests per second.")
    burst: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests allowed at once after a quiet spell (default: one second's)."
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, le=100_000_000, description="Language-model tokens (prompt and completion) per minute."
    )
    audio_seconds_per_minute: float | None = Field(
        None, gt=0, le=100_000_000, description="Seconds of audio heard (transcribed) and spoken per minute."
    )

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst is not None else max(1.0, self.requests_per_s)


class ApiKey(BaseModel):
    """One key as stored: its id, its hash, its scopes and its limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Names the key in logs and metrics.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, lower-case hex.")
    routes: tuple[Literal["*", "v1", "openai", "v2", "admin"], ...] = (ALL,)
    models: tuple[Literal["*", "vision", "text", "fusion", "ocr", "llm", "asr", "tts"], ...] = (ALL,)
    rate_limit: RateLimit | None = None
    mask: bool = Field(False, description="Mask this key's texts and answers (with security.masking.mode: keys).")

    @field_validator("routes", "models")
    @classmethod
    def _not_empty(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("must name at least one (or '*' for all)")
        return value

    def may_use(self, family: str, models: frozenset[str]) -> bool:
        return (ALL in self.routes or family in self.routes) and self.may_call(models)

    def may_call(self, models: frozenset[str]) -> bool:
        return ALL in self.models or models <= set(self.models)


class KeyList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list, max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _unique(self) -> "KeyList":
        for attribute in ("id", "sha256"):
            counts = Counter(getattr(key, attribute) for key in self.keys)
            duplicated = sorted(value for value, count in counts.items() if count > 1)
            if duplicated:
                shown = duplicated if attribute == "id" else [f"{value[:8]}…" for value in duplicated]
                raise ValueError(f"each key's {attribute} must be unique; repeated: {shown}")
        return self


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRing:
    """The keys in force: looked up by the hash of what a client presented, in constant time."""

    keys: tuple[ApiKey, ...] = ()

    def find(self, presented: str) -> ApiKey | None:
        wanted = digest(presented).encode()
        found = None
        for key in self.keys:  # no early exit: the time does not depend on where a match is
            if hmac.compare_digest(wanted, key.sha256.encode()):
                found = key
        return found


def read_keys(path: Path) -> list[ApiKey]:
    """The keys of a key file; ``ValueError`` naming the file and what is wrong (never a hash)."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
        return KeyList.model_validate(document).keys
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise ValueError(f"the key file {path} is not valid YAML") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ValueError(f"the key file {path} is invalid: {problems}") from None


class KeyFile:
    """A key file, re-read when its modification time or size changes (looked at most every ``interval_s``).

    A file that became unreadable or invalid keeps the keys last read in force (``error`` says why): a bad
    edit must not lock every client out, nor let everyone in.
    """

    def __init__(self, path: Path, interval_s: float = 1.0, clock=time.monotonic):
        self.path, self.interval_s, self.clock = path, interval_s, clock
        self._stamp = self._stat()
        self.keys = read_keys(path)  # at start-up an unusable file fails the replica: the deploy says why
        self.error: str | None = None
        self._checked = self.clock()

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last look; True if the keys changed."""
        now = self.clock()
        if now - self._checked < self.interval_s:
            return False
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = read_keys(self.path)
        except ValueError as exc:
            self.error = str(exc)
            logger.error("Kept the API keys last read: %s", self.error)
            return False
        self.error = None
        changed = keys != self.keys
        self.keys = keys
        return changed


# --- the command line: make and revoke keys ------------------------------------------------------------


def _write(path: Path, keys: list[ApiKey]) -> None:
    """Replace the file in one rename, so a replica re-reading it never sees half of it."""
    document = {"keys": [key.model_dump(exclude_none=True, mode="json") for key in keys]}
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    os.chmod(partial, 0o600)
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description="Add, revoke and list API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="make a key, store its hash in the file and print the key once")
    add.add_argument("--file", type=Path, required=True)
    add.add_argument("--id", required=True)
    add.add_argument("--routes", nargs="+", default=[ALL], help=f"route families: {', '.join(FAMILIES)} (default: *)")
    add.add_argument("--models", nargs="+", default=[ALL], help=f"models: {', '.join(MODELS)} (default: *)")
    add.add_argument("--requests-per-s", type=float)
    add.add_argument("--burst", type=int)
    add.add_argument("--tokens-per-minute", type=int)
    add.add_argument("--audio-seconds-per-minute", type=float)
    add.add_argument("--mask", action="store_true", help="mask this key's texts (security.masking.mode: keys)")
    revoke = commands.add_parser("revoke", help="remove a key from the file")
    revoke.add_argument("--file", type=Path, required=True)
    revoke.add_argument("--id", required=True)
    listing = commands.add_parser("list", help="the ids, scopes and limits in the file (never the hashes)")
    listing.add_argument("--file", type=Path, required=True)
    args = parser.parse_args(argv)

    try:
        keys = read_keys(args.file) if args.file.exists() or args.command != "add" else []
        if args.command == "list":
            for key in keys:
                limit = key.rate_limit.model_dump(exclude_none=True) if key.rate_limit else "none"
                scopes = f"routes={','.join(key.routes)}\tmodels={','.join(key.models)}"
                print(f"{key.id}\t{scopes}\trate_limit={limit}\tmask={key.mask}")
            return 0
        if args.command == "revoke":
            kept = [key for key in keys if key.id != args.id]
            if len(kept) == len(keys):
                print(f"no key with id {args.id!r} in {args.file}", file=sys.stderr)
                return 1
            _write(args.file, kept)
            print(f"revoked {args.id}", file=sys.stderr)
            return 0
        limit = None
        if args.requests_per_s is not None:
            limit = RateLimit(requests_per_s=args.requests_per_s, burst=args.burst,
                              tokens_per_minute=args.tokens_per_minute,
                              audio_seconds_per_minute=args.audio_seconds_per_minute)  # fmt: skip
        elif args.burst is not None or args.tokens_per_minute is not None or args.audio_seconds_per_minute is not None:
            print("--burst, --tokens-per-minute and --audio-seconds-per-minute need --requests-per-s", file=sys.stderr)
            return 2
        key = new_key()
        entry = ApiKey(id=args.id, sha256=digest(key), routes=args.routes, models=args.models, rate_limit=limit,
                       mask=args.mask)  # fmt: skip
        KeyList(keys=[*keys, entry])  # refuses a repeated id
    except (ValueError, ValidationError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    _write(args.file, [*keys, entry])
    print(key)  # the only time the key is shown
    return 0


if __name__ == "__main__":
    sys.exit(main())
