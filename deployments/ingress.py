"""The HTTP front door: the Serve deployment that serves ``api.app`` over the application's models.

It holds what lives per ingress replica (the dataplane with its decode threads and geometry cache, the
admission counts, the live settings) and hands them to ``api.app.build_app``, which Serve calls once the
replica is constructed (``__serve_build_asgi_app__``). Its ``user_config`` (``IngressConfig``) tunes
timeouts, admission and decoding in place. Routes live in ``api/``, the request graph in
``pipelines/dataplane.py``; the models it calls are the registry the app builder passes in.
"""

import asyncio
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from api.access import Guard
from api.app import build_app
from api.audit import Audit, replica_name
from api.context import ApiSettings
from api.limits import SharedLimits
from api.policy import ROUTES
from api.security import SecurityConfig
from deployments.admission import Admission
from deployments.contracts import MAX_GROUP_SIZE
from knowledge.rules import RuleError, compile_policies, parse_policies
from monitoring.metrics import key_metrics, request_metrics, rollout_metrics
from pipelines.dataplane import Dataplane
from pipelines.grouping import DEFAULT_GROUP_SIZE, DEFAULT_GROUPS_IN_FLIGHT
from pipelines.privacy import Privacy
from pipelines.registry import ModelRegistry
from pipelines.rollouts import Rollout, Rollouts, check_candidates, check_models

logger = logging.getLogger("ray.serve")


class IngressConfig(BaseModel):
    """The ingress's ``user_config``: timeouts and admission limits, live-tunable."""

    model_config = ConfigDict(extra="forbid")

    request_timeout_s: float = Field(
        30.0,
        gt=1.0,
        le=3600.0,
        description="The HTTP proxy's http_options.request_timeout_s; keep them equal. Model calls are given up "
        "a second before it, so the client gets this service's 503 rather than the proxy's 408.",
    )
    admission: dict[str, int] = Field(
        default_factory=dict,
        description="Requests in flight per route at one ingress replica, where they differ from the limit each "
        "route's policy declares (api.policy; GET /openapi.json lists the routes); the next one gets 503 at once. "
        "The Open Inference Protocol's infer routes share one limit, whatever the model. A streamed answer "
        "holds its slot until it ends.",
    )
    generation_timeout_s: float = Field(
        300.0,
        gt=1.0,
        le=3600.0,
        description="Timeout of the language-model routes, whose answers stream for longer than "
        "request_timeout_s; the HTTP proxy's MAAS_GENERATION_TIMEOUT_S, keep them equal.",
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of admission refusals.")
    max_concurrent_decodes: int = Field(
        2, ge=1, le=64, description="Images decoded at once per ingress replica (bounds the ingress's memory)."
    )
    max_group_size: int = Field(
        DEFAULT_GROUP_SIZE,
        ge=1,
        le=MAX_GROUP_SIZE,
        description="Concurrent requests' calls of one model method sent as one handle call, at most (1: each its "
        "own call). A call goes out at once while fewer than max_groups_in_flight are in flight; the rest wait and "
        "go together (pipelines/grouping.py).",
    )
    max_groups_in_flight: int = Field(
        DEFAULT_GROUPS_IN_FLIGHT,
        ge=1,
        le=64,
        description="Calls of one model method in flight at once per ingress replica before calls are grouped.",
    )
    readiness_timeout_s: float = Field(2.0, gt=0.0, le=60.0, description="How long /readyz waits for each model.")
    policies: dict[str, Any] = Field(
        default_factory=dict,
        description="Rule policies a request can name in its `policy` field (knowledge/rules.py): checked when "
        "loaded, with errors that name the policy and the rule.",
    )

    rollouts: dict[str, Rollout] = Field(
        default_factory=dict,
        description="Model rollouts: per model, a candidate (a Serve application serving the model's deployment), "
        "its mode (off, canary, shadow), canary weight and the judge's policy (README, Rollouts). Applied live.",
    )
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="API keys (off by default), their scopes and rate limits, and the audit trail: README, Security.",
    )

    def admission_limits(self) -> dict[str, int]:
        """Every admitted route's limit: its policy's, or this config's where it names one."""
        return ROUTES.ingress_limits() | self.admission

    @model_validator(mode="after")
    def _known_routes(self) -> "IngressConfig":
        admitted = ROUTES.ingress_limits()
        unknown = set(self.admission) - set(admitted)
        if unknown:
            raise ValueError(f"admission names unknown routes {sorted(unknown)}; known: {sorted(admitted)}")
        if any(limit < 1 for limit in self.admission.values()):
            raise ValueError("admission limits must be at least 1")
        try:
            compile_policies(parse_policies(self.policies), time_rules=False)  # timed by the replica that loads them
        except RuleError as exc:
            raise ValueError(str(exc)) from None
        check_models(self.rollouts)
        return self


@serve.deployment(max_ongoing_requests=400, ray_actor_options={"num_cpus": 0.1}, user_config={})
@serve.ingress()
class Ingress:
    """HTTP ingress over the models the app builder names (``{"vision": handle, ...}``)."""

    def __init__(self, models: dict[str, DeploymentHandle], judge: DeploymentHandle | None = None):
        self.config = IngressConfig()
        self._configured = False
        self.settings = ApiSettings(
            self.config.request_timeout_s, self.config.readiness_timeout_s, self.config.generation_timeout_s
        )
        self.admission = Admission(self.config.admission_limits(), self.config.retry_after_s)
        self.metrics = request_metrics()
        self.rollouts = Rollouts(judge, rollout_metrics())
        self.dataplane = Dataplane(
            ModelRegistry(models), self.config.max_concurrent_decodes, self.metrics, rollouts=self.rollouts
        )
        self.guard = Guard(SharedLimits(f"maas-rate-limits-{serve.get_replica_context().app_name}"))
        self.audit = Audit()
        self.privacy = Privacy()

    def __serve_build_asgi_app__(self):
        return build_app(
            self.dataplane, self.admission, self.settings, self.metrics, self.guard, self.audit, self.privacy
        )

    def _secure(self, security: SecurityConfig) -> None:
        """Apply the key and audit settings; ``ValueError`` (nothing changed) for an unusable key file."""
        keys, audit = security.api_keys, security.audit
        self.guard.configure(keys.required, keys.keys, keys.file)
        self.audit.configure(audit.enabled, audit.dir, audit.max_bytes, audit.backups, replica_name())
        self.audit.metrics = key_metrics() if self.guard.enabled else None

    async def reconfigure(self, user_config: dict) -> None:
        try:
            config = IngressConfig.model_validate(user_config or {})
            policies = self.dataplane.policies
            if not self._configured or config.policies != self.config.policies:
                # Run on the largest facts in a child process, so a slow rule is refused without stalling this one.
                policies = await asyncio.to_thread(compile_policies, parse_policies(config.policies))
            if not self._configured or config.rollouts != self.config.rollouts:
                await asyncio.to_thread(check_candidates, config.rollouts)
            self._secure(config.security)
            masking = config.security.masking
            # The first time person names are masked, loading the NER model takes seconds: off the event loop.
            await asyncio.to_thread(self.privacy.configure, masking.mode, tuple(masking.kinds), masking.region)
            if self.guard.keys and any(key.rate_limit for key in self.guard.keys.keys):
                await self.guard.limits.start()
        except (ValueError, RuleError) as exc:  # pydantic's ValidationError is a ValueError
            if not self._configured:
                raise  # fail this replica's start: the deploy reports the error
            logger.error("Kept the current ingress settings; the new ones are invalid: %s", exc)
            self.dataplane.policy_update_error = self.rollouts.update_error = str(exc)
            return
        self.rollouts.configure(config.rollouts)
        self.rollouts.update_error = None
        self.dataplane.policies = policies
        self.dataplane.policy_update_error = None
        self.dataplane.configure(config.max_concurrent_decodes, config.max_group_size, config.max_groups_in_flight)
        self.admission.configure(config.admission_limits(), config.retry_after_s)
        self.settings.request_timeout_s = config.request_timeout_s
        self.settings.readiness_timeout_s = config.readiness_timeout_s
        self.settings.generation_timeout_s = config.generation_timeout_s
        self.config, self._configured = config, True
