"""The rollouts' judge: one replica that every ingress replica reports to, so all of them route alike.

Each ingress replica calls ``report`` every second with its rollout configuration (from its ``user_config``),
when it applied it, what each variant answered since the last report and whether the candidate is ready; the
answer is what to route by. The newest configuration wins (a ``serve deploy`` reaches the ingress replicas
one after another); counts made under another configuration are dropped. The policies are evaluated here
(``pipelines.judging.Judge``), each decision logged with its reasons and counted in
``maas_rollout_decisions_total``; the candidate's weight is ``maas_rollout_weight``.

The judge saves where each rollout stands (its status, weight, candidate versions and decisions) in the Ray
cluster's key-value store (the GCS) whenever that changes. A replica that replaces it (a crash, a restart of
the application's code) goes on from there: a rolled-back candidate stays at 0%, a promoted one at 100%. Only
the current step's counts start again. A new configuration of a rollout starts it again, as it always does.
"""

import asyncio
import json
import logging

from ray import serve
from ray.experimental import internal_kv

from monitoring.metrics import judge_metrics
from pipelines.judging import Judge
from pipelines.rollouts import Rollout

logger = logging.getLogger("ray.serve")
KV_NAMESPACE = "maas"  # internal_kv is Ray's own client of the GCS store (Serve keeps its checkpoints there too)


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class RolloutJudge:
    def __init__(self):
        self.judge = Judge()
        self.metrics = judge_metrics()
        self.key = f"rollouts/{serve.get_replica_context().app_name}"
        self.saved = internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)
        for model, entry in (json.loads(self.saved) if self.saved else {}).items():
            self.judge.restore(model, Rollout.model_validate(entry["config"]), entry)
            logger.info("rollout %s: going on as %s at %s%%, as the previous judge left it",
                        model, entry["status"], entry["weight"])  # fmt: skip

    async def report(
        self, configs: dict, configured_at: float, counts: dict, ready: dict, versions: dict
    ) -> dict[str, dict]:
        """An ingress replica's configuration, counts, and its candidates' readiness and versions; returns
        ``{model: {"mode", "weight"}}`` to route by."""
        rollouts = {model: Rollout.model_validate(config) for model, config in configs.items()}
        self.judge.forget(set(rollouts), configured_at)
        for model, rollout in rollouts.items():
            self.judge.configure(model, rollout, configured_at)
            self.judge.record(model, rollout, counts.get(model, {}), ready.get(model, False), versions.get(model))
        for decision in self.judge.evaluate():
            self._log(decision)
        await self._save()
        serving = self.judge.serving()
        for model, state in serving.items():
            self.metrics.weight(model, state["weight"])
        return serving

    async def describe(self) -> dict:
        return self.judge.describe()

    async def act(self, model: str, action: str, who: str) -> dict:
        """An operator's ``pause``, ``resume``, ``promote`` or ``abort``: ``{"decision": ...}`` as taken, or
        ``{"refused": "not_found" | "conflict", "message": ...}``."""
        try:
            decision = {"model": model, **self.judge.act(model, action, who)}
        except KeyError:
            return {"refused": "not_found", "message": f"the model {model!r} has no rollout"}
        except ValueError as exc:
            return {"refused": "conflict", "message": str(exc)}
        self._log(decision)
        await self._save()
        return {"decision": decision}

    async def _save(self) -> None:
        """Save where every rollout stands, if that changed (``Judge.saved``: no counts, so a report that only
        counted writes nothing)."""
        saved = json.dumps(self.judge.saved(), sort_keys=True).encode()
        if saved != self.saved:
            await asyncio.to_thread(internal_kv._internal_kv_put, self.key, saved, True, namespace=KV_NAMESPACE)
            self.saved = saved

    def _log(self, decision: dict) -> None:
        self.metrics.decided(decision["model"], decision["decision"])
        logger.info(
            "rollout %s: %s, candidate weight %s%% -> %s%%: %s",
            decision["model"], decision["decision"], decision["from_weight"], decision["to_weight"],
            "; ".join(decision["reasons"]),
        )  # fmt: skip
