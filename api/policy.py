"""Each route's policy, declared once, beside the route: who may call it, which models it calls, how many of it
are admitted at once, and how long it may take.

A router registers a route and its ``RoutePolicy`` in one call (``declare``); everything else reads the
policy from ``ROUTES``, this module's table, and never names a route itself:

* access control checks a key's route family and models against ``family`` and ``models``
  (``api.access``); the audit line lists the models (``api.audit``);
* admission: the ingress's limits per replica default to ``ingress`` (``deployments.ingress``), the HTTP
  proxy's per proxy to ``proxy`` (``deployments.proxy``); the Serve YAML and ``MAAS_HTTP_ADMISSION`` hold
  only what an operator changes;
* the request's timeout: ``long`` routes (language-model answers, audio) get the ingress's
  ``generation_timeout_s`` and the proxy's ``MAAS_GENERATION_TIMEOUT_S``, the rest ``request_timeout_s``;
* the fuzzing hooks find the model a route serves here (``tests/integration/fuzz_hooks.py``).

A unit test builds the app and fails if a route has no policy or a policy no route
(``tests/unit/test_route_policy.py``).
"""

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from starlette.routing import compile_path

Family = Literal["v1", "openai", "v2", "admin", "open"]
"""The route families a key can be scoped to (``api.keys.FAMILIES``), or ``open``: no key needed."""
Timeout = Literal["request", "long"]

PATH_MODEL = "{model_name}"
"""In ``models``: the model the route's path names (the Open Inference Protocol's model routes)."""


@dataclass(frozen=True)
class RoutePolicy:
    """What a route may do. ``models`` are called by every request; ``optional`` only by requests that ask
    (chat's images and audio): access control checks those once the body says so (``api.access.require``)."""

    family: Family
    models: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    ingress: int | None = None  # requests in flight per ingress replica (None: not bounded)
    proxy: int | None = None  # requests in flight per HTTP proxy (None: not bounded)
    timeout: Timeout = "request"
    shares: str | None = None  # the route whose admission counts this one too (a model's versioned path)

    def describe(self) -> str:
        return f"route family {self.family!r}" + (f" and the models {sorted(self.models)}" if self.models else "")


OPEN = RoutePolicy("open")
"""Liveness, readiness and the API's description: no key, no limit."""


class RouteTable(Mapping[str, RoutePolicy]):
    """Route template -> its policy, as the routers declared them."""

    def __init__(self):
        self._policies: dict[str, RoutePolicy] = {}

    def __getitem__(self, template: str) -> RoutePolicy:
        return self._policies[template]

    def __iter__(self) -> Iterator[str]:
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)

    def declare(self, template: str, policy: RoutePolicy) -> None:
        known = self._policies.get(template)
        if known is not None and known != policy:
            raise ValueError(f"route {template} is declared twice with different policies")
        if policy.shares is not None and (policy.ingress is not None or policy.proxy is not None):
            raise ValueError(f"route {template} shares the admission of {policy.shares}: it has no limits of its own")
        self._policies[template] = policy

    def admission_key(self, template: str) -> str:
        """The count a route's requests are admitted against: its own, or the route's it shares."""
        return self._policies[template].shares or template

    def ingress_limits(self) -> dict[str, int]:
        """The ingress's admission limits per replica, by route (the defaults of ``IngressConfig.admission``)."""
        return {path: p.ingress for path, p in self._policies.items() if p.ingress is not None}

    def proxy_limits(self) -> dict[str, int]:
        """The HTTP proxy's admission limits, by route (the default of ``MAAS_HTTP_ADMISSION``)."""
        return {path: p.proxy for path, p in self._policies.items() if p.proxy is not None}

    def long_routes(self) -> list[str]:
        return [path for path, p in self._policies.items() if p.timeout == "long"]

    def models_of(self, template: str | None, path_params: dict) -> frozenset[str]:
        """The models a request of this route calls for sure (a ``PATH_MODEL`` is the one its path names)."""
        policy = self._policies.get(template) if template else None
        if policy is None:
            return frozenset()
        name = path_params.get("model_name")
        named = {name} if isinstance(name, str) else set()
        return frozenset(m for model in policy.models for m in (named if model == PATH_MODEL else {model}))

    def family_of(self, path: str) -> Family:
        """The family of a path, matched against the declared templates (``v1`` for one that matches none)."""
        template = Matcher(self).match(path)
        if template is not None:
            return self._policies[template].family
        return "v2" if path == "/v2" or path.startswith("/v2/") else "v1"


class Matcher:
    """Finds the route template a path belongs to, as Starlette's router would, for code that runs before the
    router (the HTTP proxy): exact templates by lookup, templates with parameters by their patterns."""

    def __init__(self, templates: Mapping[str, object] | list[str]):
        self.exact: dict[str, str] = {}
        self.patterns: list[tuple[re.Pattern, str]] = []
        for template in templates:
            if "{" in template:
                self.patterns.append((compile_path(template)[0], template))
            else:
                self.exact[template] = template

    def match(self, path: str) -> str | None:
        found = self.exact.get(path)
        if found is not None:
            return found
        for pattern, template in self.patterns:
            if pattern.match(path):
                return template
        return None


ROUTES = RouteTable()
"""Every route of the app and its policy, filled as the routers are imported."""


def declare(template: str, policy: RoutePolicy) -> str:
    """Record ``policy`` for the route ``template``; returns the template (for the router's registration)."""
    ROUTES.declare(template, policy)
    return template


def declared_routes() -> RouteTable:
    """``ROUTES`` with every router imported, for a process that does not build the app (the HTTP proxy)."""
    import api.app  # noqa: F401 - importing the routers declares their routes

    return ROUTES
