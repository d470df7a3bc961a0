"""Every failure as one protocol-neutral ``Problem``: status, what was wrong, headers.

The app turns whatever a route raised (an API error, a framework error, a validation error, a failed model
call) into a ``Problem`` here, and the protocol that owns the request's path renders it in its own shape:
``{"detail": [...]}`` for ``/v1``, ``{"error": "..."}`` for ``/v2``.
"""

import logging
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from starlette.exceptions import HTTPException

from deployments.downstream import api_error
from deployments.errors import MaasError

logger = logging.getLogger("ray.serve")


@dataclass
class Problem:
    status: int
    detail: list[dict]  # [{"loc": [...], "msg": "...", "type": "..."}], FastAPI's validation-error shape
    headers: dict[str, str] | None = field(default=None)

    @property
    def type(self) -> str:
        return self.detail[0]["type"] if self.detail else "error"

    def message(self) -> str:
        """The entries as one sentence, each with the field it is about: for protocols with a single message."""
        parts = []
        for entry in self.detail:
            where = ".".join(str(part) for part in entry["loc"] if part != "body")
            parts.append(f"{where}: {entry['msg']}" if where else entry["msg"])
        return "; ".join(parts)


def problem(exc: Exception) -> Problem:
    """The ``Problem`` an exception stands for; anything unexpected is a logged 500 that reveals nothing."""
    if isinstance(exc, MaasError):
        return Problem(exc.status_code, exc.detail(), exc.headers())
    if isinstance(exc, HTTPException):  # unknown route, wrong method, a malformed form
        return Problem(exc.status_code, [{"loc": [], "msg": str(exc.detail), "type": "http_error"}], exc.headers)
    if isinstance(exc, ValidationError):  # a body validated by a route itself
        errors = [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False)]
        return Problem(422, without_input(errors))
    if isinstance(exc, RequestValidationError):  # path, query or body parameters validated by FastAPI
        return Problem(422, without_input(exc.errors()))
    if (error := api_error(exc)) is not None:  # a model call that was not turned into an API error on its way
        return problem(error)
    logger.exception("Request failed", exc_info=exc)
    where = "internal error in a model replica" if isinstance(exc, (RayActorError, RayTaskError)) else "internal error"
    return Problem(500, [{"loc": [], "msg": where, "type": "internal_error"}])


HANDLED = (MaasError, HTTPException, ValidationError, RequestValidationError, RayActorError, RayTaskError)
"""What ``problem`` knows; anything else it treats as a bug."""


def without_input(errors: list[dict]) -> list[dict]:
    """Validation errors without the offending input, which can be megabytes of base64."""
    cleaned = []
    for error in errors:
        entry = {"type": error["type"], "loc": list(error["loc"]), "msg": error["msg"]}
        if ctx := error.get("ctx"):
            entry["ctx"] = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in ctx.items()}
        cleaned.append(entry)
    return cleaned
