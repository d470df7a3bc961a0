"""Judging a rollout: what each variant of a model did, and the policy's decision on the candidate.

The ingress replicas count what each variant answered in ``Window``s (requests, errors, latency, the
answers' confidence where the model kind has one, and in shadow mode the agreement with the stable answer) and
send them to the judge (``deployments.judge``), which merges them and evaluates the rollout's policy
(``Judge``): the candidate's window against the stable variant's, once the candidate has answered
``min_requests``:

* every criterion holds: the candidate moves to the policy's next canary step (the last, 100%, ends the
  rollout: ``promoted``); in shadow mode the candidate has ``passed``;
* one fails: its traffic goes back to 0% at once (``rolled_back``; in shadow mode ``failed``, and the copies
  stop). Errors beyond what ``max_error_rate`` allows over ``min_requests`` roll back before the window is full.

Windows are fixed-size histograms, so merging and sending them costs the same whatever the traffic.
"""

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from monitoring.drift import CONFIDENCE_EDGES, PSI_SMOOTHING

if TYPE_CHECKING:
    from pipelines.rollouts import Rollout

LATENCY_BOUNDS = tuple(0.001 * 1.25**i for i in range(50))  # 1 ms .. about 55 s, 25% apart
CONFIDENCE_BINS = len(CONFIDENCE_EDGES) - 1  # the drift monitor's bins, so both mean the same by drift
MAX_DECISIONS = 50  # kept per model for GET /v1/admin/rollouts


@dataclass
class Window:
    """What one variant did over a stretch of time; ``merge`` adds another's counts."""

    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    confidence_sum: float = 0.0
    compared: int = 0  # shadow answers compared with the stable one
    agreed: int = 0  # of them, those that agree with it (the model kind says what agrees: ``pipelines.rollouts``)
    measured: int = 0  # of them, those with a similarity (generated text has none)
    similarity_sum: float = 0.0  # their similarities (rank correlation, cosine), summed
    dropped: int = 0  # shadow copies not sent: the candidate's shadow budget was full

    def answered(self, seconds: float, confidence: float | None) -> None:
        self.requests += 1
        self.latency[_bucket(seconds)] += 1
        if confidence is not None:
            index = bisect.bisect_right(CONFIDENCE_EDGES, confidence) - 1
            self.confidence[min(CONFIDENCE_BINS - 1, max(0, index))] += 1
            self.confidence_sum += confidence

    def failed(self) -> None:
        self.requests += 1
        self.errors += 1

    def compare(self, agree: bool, similarity: float | None) -> None:
        self.compared += 1
        self.agreed += int(agree)
        if similarity is not None:
            self.measured += 1
            self.similarity_sum += similarity

    def merge(self, other: "Window | dict") -> None:
        other = other if isinstance(other, Window) else Window(**other)
        counts = ("requests", "errors", "confidence_sum", "compared", "agreed", "measured", "similarity_sum", "dropped")
        for name in counts:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        self.confidence = [a + b for a, b in zip(self.confidence, other.confidence)]

    def empty(self) -> bool:
        return self.requests == 0 and self.compared == 0 and self.dropped == 0

    def as_dict(self) -> dict:
        return dict(vars(self))

    # --- what the criteria read --------------------------------------------------------------

    @property
    def answers(self) -> int:
        return sum(self.confidence)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.answers if self.answers else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def similarity(self) -> float | None:
        return self.similarity_sum / self.measured if self.measured else None

    def latency_quantile(self, q: float) -> float | None:
        """The upper bound of the latency bucket the q-quantile falls in (seconds)."""
        total = sum(self.latency)
        if not total:
            return None
        seen = 0
        for index, count in enumerate(self.latency):
            seen += count
            if seen >= q * total:
                return LATENCY_BOUNDS[min(index, len(LATENCY_BOUNDS) - 1)]
        return LATENCY_BOUNDS[-1]

    def summary(self) -> dict:
        p50, p95 = self.latency_quantile(0.5), self.latency_quantile(0.95)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "latency_p95_ms": None if p95 is None else round(p95 * 1000, 1),
            "mean_confidence": _rounded(self.mean_confidence),
            "compared": self.compared,
            "agreement": _rounded(self.agreement),
            "similarity": _rounded(self.similarity),
            "shadow_dropped": self.dropped,
        }


def _bucket(seconds: float) -> int:
    if seconds <= LATENCY_BOUNDS[0]:
        return 0
    return min(len(LATENCY_BOUNDS), math.ceil(math.log(seconds / LATENCY_BOUNDS[0], 1.25)))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def psi(reference: list[int], observed: list[int]) -> float | None:
    """Population stability index of the candidate's confidences against the stable variant's (None if either
    histogram is empty), over the drift monitor's bins.

    Both are samples, so every bin of both gets the same small share: the drift monitor's pseudo-count over the
    candidate's window (``monitoring.drift`` smooths only the live side, against a reference profile that has
    every bin). Otherwise a stable variant that only saw one kind of input would make an equal candidate's
    smoothed empty bins look like drift.
    """
    if not sum(reference) or not sum(observed):
        return None
    floor = PSI_SMOOTHING / sum(observed)
    expected = np.asarray(reference, float) / sum(reference) + floor
    actual = np.asarray(observed, float) / sum(observed) + floor
    expected, actual = expected / expected.sum(), actual / actual.sum()
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors over the same labels."""
    ranks_a = np.argsort(np.argsort(a)).astype(float)
    ranks_b = np.argsort(np.argsort(b)).astype(float)
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return 1.0 if np.array_equal(ranks_a, ranks_b) else 0.0
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


@dataclass
class Check:
    criterion: str
    value: float | None
    limit: float
    holds: bool

    def describe(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4g}"
        return f"{self.criterion}: {shown} ({'holds' if self.holds else 'fails'}, limit {self.limit:g})"


def checks(rollout: "Rollout", candidate: Window, reference: Window) -> list[Check]:
    """Each criterion of the rollout's policy on the candidate's window against the stable variant's.

    A criterion without data on one side (no stable reference yet, no comparisons outside shadow mode) is
    left out: it neither holds nor fails.
    """
    criteria = rollout.policy.criteria
    found = [Check("max_error_rate", candidate.error_rate, criteria.max_error_rate,
                   candidate.error_rate <= criteria.max_error_rate)]  # fmt: skip
    stable_p95, candidate_p95 = reference.latency_quantile(0.95), candidate.latency_quantile(0.95)
    if stable_p95 and candidate_p95:
        ratio = candidate_p95 / stable_p95
        found.append(Check("max_p95_latency_ratio", ratio, criteria.max_p95_latency_ratio,
                           ratio <= criteria.max_p95_latency_ratio))  # fmt: skip
    if reference.mean_confidence is not None and candidate.mean_confidence is not None:
        drop = reference.mean_confidence - candidate.mean_confidence
        found.append(Check("max_confidence_drop", drop, criteria.max_confidence_drop,
                           drop <= criteria.max_confidence_drop))  # fmt: skip
    shift = psi(reference.confidence, candidate.confidence)
    if shift is not None:
        found.append(Check("max_confidence_psi", shift, criteria.max_confidence_psi,
                           shift <= criteria.max_confidence_psi))  # fmt: skip
    if candidate.agreement is not None:
        found.append(Check("min_agreement", candidate.agreement, criteria.min_agreement,
                           candidate.agreement >= criteria.min_agreement))  # fmt: skip
    return found


@dataclass
class RolloutState:
    """One model's rollout as the judge runs it: the configuration it came from, where it stands, and the
    windows it is judged on."""

    config: "Rollout"
    configured_at: float  # when an ingress replica applied this configuration (the newest one wins)
    status: str  # off | shadow | canary | paused | promoted | rolled_back | aborted | passed | failed
    weight: float  # the candidate's share of traffic, percent (canary)
    candidate_ready: bool = False
    candidate_version: str | None = None  # what the candidate's replicas serve; a new one restarts the rollout
    versions_seen: set = field(default_factory=set)
    started: float = field(default_factory=time.time)
    step_started: float = field(default_factory=time.time)
    candidate: Window = field(default_factory=Window)  # since the current step began
    stable: Window = field(default_factory=Window)  # since the rollout began: the reference
    total: dict[str, Window] = field(default_factory=lambda: {"stable": Window(), "candidate": Window()})
    decisions: deque = field(default_factory=lambda: deque(maxlen=MAX_DECISIONS))
    last_evaluated: float = 0.0

    @classmethod
    def start(cls, config: "Rollout", configured_at: float) -> "RolloutState":
        status = {"off": "off", "shadow": "shadow", "canary": "canary"}[config.mode]
        return cls(config, configured_at, status, config.weight if config.mode == "canary" else 0.0)

    @property
    def serving(self) -> dict:
        """What the ingress replicas route by: the mode in force and the candidate's weight."""
        modes = {"shadow": "shadow", "passed": "shadow", "canary": "canary", "promoted": "canary"}
        mode = self.config.mode if self.status == "paused" else modes.get(self.status, "off")
        return {"mode": mode, "weight": self.weight if mode == "canary" else 0.0}

    def decide(self, decision: str, reasons: list[str], weight: float, status: str, now: float) -> dict:
        entry = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "decision": decision,
            "from_weight": self.weight,
            "to_weight": weight,
            "status": status,
            "reasons": reasons,
        }
        self.decisions.append(entry)
        self.weight, self.status = weight, status
        self.candidate, self.step_started = Window(), now
        return entry


class Judge:
    """Every model's rollout: merges the windows the ingress replicas report and evaluates each policy.

    ``record`` takes a report; ``evaluate`` runs each policy whose interval has passed and returns the
    decisions it took; ``act`` applies an operator's pause, resume, promote or abort.
    """

    def __init__(self, clock=time.time):
        self.clock = clock
        self.rollouts: dict[str, RolloutState] = {}

    def configure(self, model: str, config: "Rollout", configured_at: float) -> None:
        """Adopt a model's configuration if it is newer than the one in force and differs from it."""
        state = self.rollouts.get(model)
        if state is not None and (configured_at <= state.configured_at or config == state.config):
            if config == state.config:
                state.configured_at = max(state.configured_at, configured_at)
            return
        self.rollouts[model] = RolloutState.start(config, configured_at)

    def saved(self) -> dict[str, dict]:
        """What a new judge needs to go on where this one stands (``restore``): per model, the configuration and
        when it was applied, the status, the weight, the candidate's versions and the decisions. The current
        step's counts are not kept: after a restore the step is judged on counts from then on."""
        return {
            model: {
                "config": state.config.model_dump(),
                "configured_at": state.configured_at,
                "status": state.status,
                "weight": state.weight,
                "candidate_version": state.candidate_version,
                "versions_seen": sorted(state.versions_seen),
                "started": state.started,
                "decisions": list(state.decisions),
            }
            for model, state in self.rollouts.items()
        }

    def restore(self, model: str, config: "Rollout", saved: dict) -> None:
        """Go on with a rollout as ``saved`` (one model's entry of ``saved()``) left it."""
        state = RolloutState.start(config, saved["configured_at"])
        state.status, state.weight = saved["status"], saved["weight"]
        state.candidate_version, state.versions_seen = saved["candidate_version"], set(saved["versions_seen"])
        state.started, state.step_started = saved["started"], self.clock()
        state.decisions.extend(saved["decisions"])
        self.rollouts[model] = state

    def forget(self, models: set[str], configured_at: float) -> None:
        """Drop the rollouts of models an ingress replica configured at ``configured_at`` no longer has."""
        for model in list(self.rollouts):
            if model not in models and configured_at > self.rollouts[model].configured_at:
                del self.rollouts[model]

    def record(
        self, model: str, config: "Rollout", windows: dict[str, dict], ready: bool, version: str | None = None
    ) -> None:
        """A replica's counts for ``model``, made under ``config`` (counts under another one are dropped), and
        the candidate's version. A version not seen before in this rollout (a new candidate model deployed under
        the same rollout) starts the rollout again from its configuration."""
        state = self.rollouts.get(model)
        if state is None or state.config != config:
            return
        if version is not None and version not in state.versions_seen:
            if state.versions_seen:
                seen = state.versions_seen
                state = self.rollouts[model] = RolloutState.start(config, state.configured_at)
                state.versions_seen = seen
                windows = {}  # counted (at least partly) on the previous version
            state.versions_seen.add(version)
            state.candidate_version = version
        state.candidate_ready = ready
        for variant, counts in windows.items():
            window = Window(**counts)
            state.total[variant].merge(window)
            (state.candidate if variant == "candidate" else state.stable).merge(window)

    def evaluate(self) -> list[dict]:
        now, decisions = self.clock(), []
        for model, state in self.rollouts.items():
            if state.status not in ("canary", "shadow") or not state.config.policy.auto:
                continue
            if now - state.last_evaluated < state.config.policy.interval_s:
                continue
            state.last_evaluated = now
            decision = self._evaluate(state, now)
            if decision is not None:
                decisions.append({"model": model, **decision})
        return decisions

    def _evaluate(self, state: RolloutState, now: float) -> dict | None:
        policy, window = state.config.policy, state.candidate
        shadow = state.status == "shadow"
        seen = window.compared if shadow else window.requests
        allowed_errors = policy.criteria.max_error_rate * policy.min_requests
        if seen < policy.min_requests and window.errors <= allowed_errors:
            return None
        found = checks(state.config, window, state.stable)
        reasons = [check.describe() for check in found] + [f"over {seen} {'comparisons' if shadow else 'requests'}"]
        if all(check.holds for check in found):
            if shadow:
                return state.decide("passed", reasons, 0.0, "passed", now)
            later = [step for step in policy.steps if step > state.weight]
            if not later:
                return state.decide("promoted", reasons, 100.0, "promoted", now)
            return state.decide("step", reasons, later[0], "canary", now)
        failing = [check.describe() for check in found if not check.holds] + reasons[-1:]
        if shadow:
            return state.decide("failed", failing, 0.0, "failed", now)
        return state.decide("rolled_back", failing, 0.0, "rolled_back", now)

    def act(self, model: str, action: str, reason: str = "operator") -> dict:
        """An operator's decision: ``pause`` (hold the weight), ``resume``, ``promote`` (the next step now) or
        ``abort`` (0% at once). ``KeyError`` for a model without a rollout, ``ValueError`` for an action its
        state does not allow."""
        state = self.rollouts[model]
        now, reasons = self.clock(), [f"{action} by {reason}"]
        if action == "abort":
            if state.status in ("off", "aborted", "rolled_back", "failed"):
                raise ValueError(f"the {model} rollout is {state.status}; there is nothing to abort")
            return state.decide("aborted", reasons, 0.0, "aborted", now)
        if action == "pause":
            if state.status not in ("canary", "shadow"):
                raise ValueError(f"only a running canary or shadow can be paused; the {model} rollout is "
                                 f"{state.status}")  # fmt: skip
            return state.decide("paused", reasons, state.weight, "paused", now)
        if action == "resume":
            if state.status != "paused":
                raise ValueError(f"only a paused rollout can be resumed; the {model} rollout is {state.status}")
            return state.decide("resumed", reasons, state.weight, state.config.mode, now)
        if action == "promote":
            if state.status not in ("canary", "paused") or state.config.mode != "canary":
                raise ValueError(f"only a canary can be promoted; the {model} rollout is {state.status}")
            later = [step for step in state.config.policy.steps if step > state.weight]
            if not later:
                return state.decide("promoted", reasons, 100.0, "promoted", now)
            return state.decide("step", reasons, later[0], "canary", now)
        raise ValueError(f"unknown action {action!r}")

    def serving(self) -> dict[str, dict]:
        return {model: state.serving for model, state in self.rollouts.items()}

    def describe(self) -> dict[str, dict]:
        """Every rollout as ``GET /v1/admin/rollouts`` shows it."""
        described = {}
        for model, state in self.rollouts.items():
            shown = state.serving
            described[model] = {
                "candidate": state.config.candidate,
                "mode": state.config.mode,
                "status": state.status,
                "weight": shown["weight"],
                "candidate_ready": state.candidate_ready,
                "candidate_version": state.candidate_version,
                "policy": state.config.policy.model_dump(),
                "step": {
                    "since_s": round(self.clock() - state.step_started, 1),
                    "candidate": state.candidate.summary(),
                    "checks": [vars(check) for check in checks(state.config, state.candidate, state.stable)],
                },
                "variants": {variant: window.summary() for variant, window in state.total.items()},
                "decisions": list(state.decisions),
            }
        return described
