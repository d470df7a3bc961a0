"""Access control: every request's API key, its scopes and its rate limit, checked before the route runs.

An ASGI middleware, so a refused request costs no body read, no parsing and no admission slot: it matches the
route itself (what Starlette's router would), looks up the ``Authorization: Bearer`` key, checks the route's
family and models against the key's scopes, and asks the key's rate limit. A refusal is rendered by the
protocol that owns the path (``render``), in that protocol's error shape:

* no key, or an unknown one: ``401`` with ``WWW-Authenticate: Bearer`` (RFC 6750);
* a key without the route family or one of the route's models: ``403``;
* over the key's rate limit: ``429`` with ``Retry-After``.

Open without a key: liveness and readiness (``/healthz``, ``/readyz``, the OIP's health and model-readiness
routes), which load balancers and Kubernetes probe without credentials and which say only whether models
can serve; and the API's description (``/openapi.json``, ``/docs``), which holds no data. Every other path,
unknown ones included, needs a key, so a caller without one learns nothing about which routes exist.
"""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from api.keys import ApiKey, KeyFile, KeyList, KeyRing
from api.limits import SharedLimits, retry_after
from api.policy import ROUTES
from api.problems import Problem, problem
from deployments.errors import Forbidden, InvalidInput, MaasError, RateLimited, Unauthorized
from pipelines import usage
from pipelines.privacy import Privacy
from pipelines.rollouts import CALLER_HEADER, PIN_HEADER, VARIANTS

logger = logging.getLogger("ray.serve")

Renderer = Callable[[str, Problem], Callable[[Scope, Receive, Send], Awaitable[None]]]
"""The error response of a path's protocol."""


@dataclass(frozen=True)
class Requirement:
    family: str
    models: frozenset[str]

    def describe(self) -> str:
        models = f" and the models {sorted(self.models)}" if self.models else ""
        return f"route family {self.family!r}{models}"


def models_of(template: str | None, path_params: dict) -> frozenset[str]:
    """The models a route calls for every request (a ``/v2/models/{model_name}`` route: the one its path names)."""
    return ROUTES.models_of(template, path_params)


def requirement(template: str | None, path: str, path_params: dict) -> Requirement | None:
    """What a request needs: ``None`` for an open route, else the family and the models (its route's policy)."""
    policy = ROUTES.get(template) if template else None
    if policy is None:  # an unknown path: any valid key may learn it is a 404
        return Requirement("v2" if path == "/v2" or path.startswith("/v2/") else "v1", frozenset())
    if policy.family == "open":
        return None
    return Requirement(policy.family, models_of(template, path_params))


def require_models(request, models: set[str]) -> None:
    """Refuse (403) a request whose API key may not use ``models``, which its body asks for beyond its route's
    own (a chat's images and audio: the route's policy names them ``optional``). Recorded for the audit line."""
    key = request.scope.get("state", {}).get("api_key")
    used = usage.current()
    if used is not None:
        used.models.update(models)
    if key is not None and not key.may_call(frozenset(models)):
        raise Forbidden(f"the API key {key.id!r} may not use the models {sorted(models)} this request asks for")


class Guard:
    """The keys in force (``keys``: None while API keys are off), the file they come from, and their limits.

    ``configure`` applies the ingress's settings; ``refresh`` re-reads a key file that changed (at most once a
    second), so a key added to or removed from the file counts from the next request.
    """

    def __init__(self, limits: SharedLimits | None = None):
        self.limits = limits
        self.keys: KeyRing | None = None
        self.file: KeyFile | None = None
        self._inline: tuple[ApiKey, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def configure(self, required: bool, inline: list[ApiKey], path: str | None) -> None:
        """Raises ``ValueError`` (and changes nothing) for an unreadable file or an id given twice."""
        file = self.file
        if path is None:
            file = None
        elif file is None or str(file.path) != path:
            file = KeyFile(Path(path))
        self._ring(inline, file)  # checks before anything changes
        self.file, self._inline = file, tuple(inline)
        self.keys = self._ring(self._inline, self.file) if required else None

    def refresh(self) -> None:
        if self.keys is not None and self.file is not None and self.file.refresh():
            try:
                self.keys = self._ring(self._inline, self.file)
            except ValueError as exc:
                self.file.error = str(exc)
                logger.error("Kept the API keys last read: %s", self.file.error)

    @staticmethod
    def _ring(inline, file: KeyFile | None) -> KeyRing:
        keys = [*inline, *(file.keys if file else ())]
        KeyList(keys=keys)  # ids and hashes unique across the config and the file
        return KeyRing(tuple(keys))


def bearer(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header ('' for another scheme or an empty one), or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class AccessMiddleware:
    """Authenticates, authorises and rate-limits every HTTP request (see the module's docstring).

    Puts the caller's key in ``scope["state"]["api_key"]`` (None with keys off or on an open route) for the
    audit log and the metrics, and the refusal's type in ``scope["state"]["error_type"]``.
    """

    def __init__(self, app: ASGIApp, guard: Guard, render: Renderer, routes: list, privacy: Privacy | None = None):
        self.app, self.guard, self.render, self.routes = app, guard, render, routes
        self.privacy = privacy or Privacy()

    def _match(self, scope: Scope) -> tuple[object | None, dict]:
        for route in self.routes:
            matched, child = route.matches(scope)
            if matched == Match.FULL:
                return route, child.get("path_params", {})
        return None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        state["api_key"] = None
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        used = usage.current()
        if self.guard.enabled:
            route, params = self._match(scope)
            needed = requirement(getattr(route, "path", None), scope["path"], params)
            if route is not None:
                scope["route"] = route  # the metrics label a refused request by its route template
            try:
                if needed is not None:
                    await self.check(scope, needed)
            except MaasError as exc:
                answer = problem(exc)
                state["error_type"] = answer.type
                return await self.render(scope["path"], answer)(scope, receive, send)
        if used is not None:
            used.masker = self.privacy.for_key(state["api_key"])
            try:
                used.caller, used.pin = rollout_caller(scope, state["api_key"], self.guard.enabled)
            except MaasError as exc:
                answer = problem(exc)
                state["error_type"] = answer.type
                return await self.render(scope["path"], answer)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            if self.guard.limits and state["api_key"] is not None and used is not None:
                if used.tokens or used.audio_seconds:
                    await self.guard.limits.charge(
                        state["api_key"], {"tokens": used.tokens, "audio": used.audio_seconds}
                    )

    async def check(self, scope: Scope, needed: Requirement) -> None:
        """Puts the key in ``scope["state"]["api_key"]`` once it is known, or raises the refusal."""
        self.guard.refresh()
        token = bearer(scope)
        if not token:
            raise Unauthorized("an API key is required: send it as 'Authorization: Bearer <key>'",
                               presented=token is not None)  # fmt: skip
        key = self.guard.keys.find(token)
        if key is None:
            raise Unauthorized("the API key is not valid", presented=True)
        scope["state"]["api_key"] = key
        if not key.may_use(needed.family, needed.models):
            raise Forbidden(f"the API key {key.id!r} may not use {needed.describe()}")
        waited = await self.guard.limits.admit(key) if self.guard.limits else 0.0
        if waited > 0:
            seconds = retry_after(waited)
            raise RateLimited(f"the API key {key.id!r} is over its rate limit; retry after {seconds} s",
                              retry_after_s=seconds)  # fmt: skip


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (its first 128 characters), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")[:128]
    return None


def rollout_caller(scope: Scope, key: ApiKey | None, keys_on: bool) -> tuple[str | None, str | None]:
    """Who is calling, for a rollout's sticky split (the key's id, or ``X-Maas-Caller`` without keys), and the
    variant the request pins with ``X-Maas-Variant``: refused unless it names one, and with keys on unless the
    key has the admin scope."""
    caller = key.id if key is not None else header(scope, CALLER_HEADER.lower().encode())
    pin = header(scope, PIN_HEADER.lower().encode())
    if pin is None:
        return caller, None
    pin = pin.strip().lower()
    if pin not in VARIANTS:
        raise InvalidInput(f"the {PIN_HEADER} header names a variant: one of {', '.join(VARIANTS)}")
    if keys_on and (key is None or not key.may_use("admin", frozenset())):
        key_id = f" {key.id!r}" if key is not None else ""
        raise Forbidden(f"pinning a variant ({PIN_HEADER}) needs an API key with the admin scope; "
                        f"the key{key_id} has not")  # fmt: skip
    return caller, pin


REFUSALS = {
    "401": "With API keys on: no key, or one the service does not know (`WWW-Authenticate: Bearer`).",
    "403": "With API keys on: the key may not use this route family or one of its models.",
    "429": "With API keys on: the key is over its rate limit; retry after `Retry-After` seconds.",
}


def document(schema: dict) -> dict:
    """An OpenAPI document with the bearer scheme and the refusals of access control on every guarded route."""
    open_paths = {path.replace(":path}", "}") for path, policy in ROUTES.items() if policy.family == "open"}
    for path, operations in schema.get("paths", {}).items():
        if path in open_paths:
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, description in REFUSALS.items():
                responses.setdefault(status, {"description": description})
    schema.setdefault("components", {})["securitySchemes"] = {
        "apiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key, where keys are on (README: Security); without keys every route is open.",
        }
    }
    return schema
