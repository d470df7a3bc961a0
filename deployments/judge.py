"""The rollouts' judge: one replica that every ingress replica reports to, so all of them route alike.

Each ingress replica calls ``report`` every second with its rollout configuration (from its ``user_config``),
when it applied it, what each variant answered since the last report and whether the candidate is ready; the
answer is what to route by. The newest configuration wins (a ``serve deploy`` reaches the ingress replicas
one after another); counts made under another configuration are dropped. The policies are evaluated here
(``pipelines.judging.Judge``), each decision logged with its reasons and counted in
``maas_rollout_decisions_total``; the candidate's weight is ``maas_rollout_weight``.

The judge keeps its state in memory. If its replica is replaced, each rollout starts again from its
configuration (the YAML's mode and weight), so a rolled-back candidate is kept at 0% by setting its mode to
``off`` in the YAML, as the decision log says.
"""

import logging

from ray import serve

from monitoring.metrics import judge_metrics
from pipelines.judging import Judge
from pipelines.rollouts import Rollout

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class RolloutJudge:
    def __init__(self):
        self.judge = Judge()
        self.metrics = judge_metrics()

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
        return {"decision": decision}

    def _log(self, decision: dict) -> None:
        self.metrics.decided(decision["model"], decision["decision"])
        logger.info(
            "rollout %s: %s, candidate weight %s%% -> %s%%: %s",
            decision["model"], decision["decision"], decision["from_weight"], decision["to_weight"],
            "; ".join(decision["reasons"]),
        )  # fmt: skip
