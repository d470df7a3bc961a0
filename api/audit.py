"""The audit trail: one JSON line per HTTP request, and the per-key metrics.

Each line says who called what and what came of it, never what was sent or answered::

    {"time": "2026-12-03T14:02:11.512Z", "request_id": "6f0c…", "key_id": "team-a", "method": "POST",
     "route": "/v1/text/classify", "models": ["text"], "status": 200, "latency_ms": 41.7,
     "bytes_in": 96, "bytes_out": 230, "prompt_tokens": 0, "completion_tokens": 0, "audio_seconds": 0.0,
     "masked": {}, "variants": {}}

``key_id`` is the key's configured id (null with keys off, or when no valid key was sent); ``route`` is the
route template (``/v2/models/{model_name}/infer``), so no path carries data; ``models`` are those its route's
policy names and those its body asked for (a chat's images and audio); ``audio_seconds`` is the audio it had
heard and spoken; ``masked`` counts the personal data masked by kind; ``variants`` names, for each model
with a rollout, the variant that answered (``{"vision": "candidate"}``; also the ``X-Maas-Variant`` response
header). Each ingress replica writes its own file (two processes rotating one file would lose lines):
``maas-audit-<replica>.jsonl`` in ``security.audit.dir``
(default: Ray's session log folder, ``logs/serve``), rotated at ``max_bytes`` with ``backups`` old files kept.
"""

import json
import logging
import logging.handlers
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.access import header, models_of
from monitoring.metrics import KeyMetrics
from pipelines import usage
from pipelines.rollouts import PIN_HEADER

FILE_PREFIX = "maas-audit-"
MASKED_HEADER = b"x-maas-masked"
"""Response header: what personal data was masked, by kind, never the values (``email=1,person=2``)."""


def default_dir() -> Path:
    """Ray's log folder for Serve on this node, where the replicas' own logs are; a temporary folder outside Ray."""
    try:
        from ray.serve._private.logging_utils import get_serve_logs_dir

        return Path(get_serve_logs_dir())
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return Path(tempfile.gettempdir())


class AuditLog:
    """A rotating JSON-lines file of its own (not the replica's log, which Ray's log settings govern)."""

    def __init__(self, directory: Path, name: str, max_bytes: int, backups: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{FILE_PREFIX}{name}.jsonl"
        self.logger = logging.getLogger(f"maas.audit.{name}")
        self.logger.propagate = False  # never into the replica's log or the driver's console
        self.logger.setLevel(logging.INFO)
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backups)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)

    def write(self, entry: dict) -> None:
        self.logger.info(json.dumps(entry, separators=(",", ":")))

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()


class AuditMiddleware:
    """Writes the audit line (``log``, None: off) and counts the request per key (``metrics``, with keys on)."""

    def __init__(self, app: ASGIApp, audit: "Audit"):
        self.app, self.audit = app, audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        used = usage.begin()
        status, bytes_in, bytes_out = None, 0, 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                if used.masked:  # what was masked so far: all of it, except a streamed answer's own
                    shown = ",".join(f"{kind}={count}" for kind, count in sorted(used.masked.items()))
                    message["headers"] = [*message.get("headers", []), (MASKED_HEADER, shown.encode())]
                if used.variants:  # which variant of a model with a rollout answered
                    shown = ",".join(f"{model}={variant}" for model, variant in sorted(used.variants.items()))
                    message["headers"] = [*message.get("headers", []), (PIN_HEADER.lower().encode(), shown.encode())]
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            state = scope.get("state", {})
            key = state.get("api_key")
            status = status or 500
            if self.audit.metrics is not None:
                self.audit.metrics.observe(key.id if key else None, status, state.get("error_type"),
                                           used.prompt_tokens, used.completion_tokens, used.audio_seconds)  # fmt: skip
            if self.audit.log is not None:
                route = getattr(scope.get("route"), "path", None)
                self.audit.log.write({
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "request_id": header(scope, b"x-request-id"),
                    "key_id": key.id if key else None,
                    "method": scope.get("method"),
                    "route": route or "unmatched",
                    "models": sorted(models_of(route, scope.get("path_params", {})) | used.models),
                    "status": status,
                    "latency_ms": round((time.perf_counter() - start) * 1000, 1),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "prompt_tokens": used.prompt_tokens,
                    "completion_tokens": used.completion_tokens,
                    "audio_seconds": round(used.audio_seconds, 3),
                    "masked": dict(used.masked),
                    "variants": dict(used.variants),
                })  # fmt: skip


class Audit:
    """What the audit middleware writes to: the log (None: off) and the per-key metrics (None: keys off)."""

    def __init__(self):
        self.log: AuditLog | None = None
        self.metrics: KeyMetrics | None = None
        self._settings: tuple | None = None

    def configure(self, enabled: bool, directory: str | None, max_bytes: int, backups: int, name: str) -> None:
        settings = (enabled, directory, max_bytes, backups)
        if settings == self._settings:
            return
        if self.log is not None:
            self.log.close()
        where = Path(directory) if directory else default_dir()
        self.log = AuditLog(where, name, max_bytes, backups) if enabled else None
        self._settings = settings


def replica_name() -> str:
    """This ingress replica's id (its audit file's name), or the process id outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica
        return str(os.getpid())
