"""Rollouts: a model's candidate variant beside its stable one, and which of them answers each request.

A candidate is a deployment of its own, usually the model's deployment in a Serve application of its own
(``pipelines.candidates``), named in the ingress's ``user_config`` under ``rollouts`` with a mode:

* ``canary``: ``weight`` percent of requests go to the candidate. The split is sticky: a caller's API key id
  (or its ``X-Maas-Caller`` header when keys are off) always hashes to the same variant. A candidate that fails
  a canary request is counted and the request is answered by the stable variant;
* ``shadow``: the stable variant answers; a copy goes to the candidate afterwards, within a budget of copies in
  flight (a copy that does not fit is dropped and counted), and the two answers are compared. Requests whose
  texts are masked (their key or the service asks for it) are never copied;
* ``off``: the stable variant answers everything.

``X-Maas-Variant: stable|candidate`` pins a request to a variant for testing (with keys on, only for keys with
the ``admin`` scope); pinned requests are left out of what the judge decides on. The judge
(``pipelines.judging``, run by ``deployments.judge``) moves the candidate's weight through the policy's steps,
or back to 0%, from the counts every ingress replica sends it (``Rollouts.sync``); an ingress replica routes by
the judge's last answer. A candidate none of whose replicas is ready gets no traffic.
"""

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contracts import OcrResult, TextEmbeddings, TextRanking, TextScores
from deployments.downstream import api_error
from deployments.errors import ModelUnavailable
from pipelines import usage
from pipelines.grouping import Grouped
from pipelines.judging import Window, rank_correlation
from pipelines.registry import ModelRegistry, serve_status

logger = logging.getLogger("ray.serve")

EMBEDDING_AGREEMENT = 0.99  # the cosine at which two embeddings of one text agree
VARIANTS = ("stable", "candidate")
CALLER_HEADER = "X-Maas-Caller"
PIN_HEADER = "X-Maas-Variant"
SYNC_S = 1.0  # how often an ingress replica sends its counts to the judge and reads its decisions
JUDGE_TIMEOUT_S = 2.0
SHADOW_TIMEOUT_S = 60.0  # a shadow copy not answered by then (the request timeout) counts as the candidate's error


class Criteria(BaseModel):
    """What the candidate must do, over its window, for the judge to promote it (any failing rolls it back)."""

    model_config = ConfigDict(extra="forbid")

    max_error_rate: float = Field(0.01, ge=0.0, le=1.0, description="Share of the candidate's requests that fail.")
    max_p95_latency_ratio: float = Field(
        2.0, gt=0.0, le=100.0, description="The candidate's p95 latency over the stable variant's."
    )
    max_confidence_drop: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="The stable variant's mean confidence (vision: the top class's probability; zero-shot text: "
        "the top label's score; OCR: the mean line confidence) minus the candidate's. Over 200 answers to "
        "varied photos an equal candidate's mean moves by about 0.02 (one standard error) from sampling alone.",
    )
    max_confidence_psi: float = Field(
        0.25,
        gt=0.0,
        le=10.0,
        description="Drift (PSI, as the drift monitor's) of the candidate's confidences against the stable "
        "variant's. Over a small window PSI is mostly sampling noise: for an equal candidate its 99th percentile "
        "is about 0.24 over 100 answers and 0.13 over 200 (pipelines/judging.py).",
    )
    min_agreement: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Shadow mode: share of copies whose answer agrees with the stable one (the same top class or "
        "top label, every embedding at a cosine of at least 0.99, the same lines read, the same generated or "
        "transcribed text).",
    )


class Policy(BaseModel):
    """How the judge moves a rollout: the canary's steps, the window each is judged on, and the criteria."""

    model_config = ConfigDict(extra="forbid")

    auto: bool = Field(True, description="The judge decides; false: it only reports what it would check.")
    steps: list[float] = Field(
        default_factory=lambda: [5.0, 25.0, 50.0, 100.0],
        min_length=1,
        max_length=20,
        description="The candidate's weights, percent, in order; the last is 100 (the candidate serves all).",
    )
    min_requests: int = Field(
        200,
        ge=10,
        le=1_000_000,
        description="Candidate requests (shadow: comparisons) a step is judged on; fewer make the drift criterion "
        "noisy (max_confidence_psi).",
    )
    interval_s: float = Field(5.0, ge=0.5, le=3600.0, description="How often the judge evaluates.")
    criteria: Criteria = Field(default_factory=Criteria)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if any(not 0 < step <= 100 for step in steps) or steps != sorted(set(steps)):
            raise ValueError("steps must be increasing percentages in (0, 100]")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100: the candidate ends serving everything")
        return steps


class Rollout(BaseModel):
    """One model's candidate and how it gets traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="The Serve application serving the candidate."
    )
    deployment: str | None = Field(
        None, description="The candidate's deployment in that application (default: the model's own deployment)."
    )
    mode: Literal["off", "canary", "shadow"] = "off"
    weight: float = Field(0.0, ge=0.0, le=100.0, description="Canary: percent of requests the candidate answers.")
    shadow_in_flight: int = Field(
        4, ge=1, le=256, description="Shadow: copies in flight at once per ingress replica; the next is dropped."
    )
    shadow_percent: float = Field(
        100.0,
        gt=0.0,
        le=100.0,
        description="Shadow: percent of requests copied. Each copy costs the candidate what the answer cost the "
        "stable variant; where both share the CPUs, copy fewer (docs/BENCHMARKS.md, Shadow traffic).",
    )
    policy: Policy = Field(default_factory=Policy)


# --- what each model kind compares ---------------------------------------------------------------


def confidence(result) -> float | None:
    """The answer's confidence: the top class's probability, the top label's score, or OCR's mean line
    confidence (None: the kind has none, or the answer nothing to be confident of)."""
    if isinstance(result, OcrResult):
        return float(np.mean([line.confidence for line in result.lines])) if result.lines else None
    labels = getattr(result, "labels", None)
    return float(labels[0][1]) if labels else None


def compare(stable, candidate) -> tuple[bool, float | None]:
    """Whether the candidate's answer agrees with the stable one, and how similar the two are (None: no measure).

    * classes (vision): the same top class; the rank correlation of the scores over every class;
    * labels (zero-shot text): the same top label; the rank correlation of the labels' scores;
    * embeddings (text): every text's two vectors at a cosine of at least ``EMBEDDING_AGREEMENT``; the mean cosine;
    * relevance scores (text): the same best document; the rank correlation of the scores;
    * lines read (ocr): the same lines, exactly; the share of the stable variant's lines read the same, in order;
    * generated or transcribed text (llm and asr, greedy only): the same text, exactly; no similarity.
    """
    if isinstance(stable, str):
        return stable == candidate, None
    if isinstance(stable, OcrResult):
        a, b = [line.text for line in stable.lines], [line.text for line in candidate.lines]
        same = sum(x == y for x, y in zip(a, b))
        return a == b, (same / max(len(a), len(b)) if a or b else 1.0)
    if isinstance(stable, TextEmbeddings):
        if stable.vectors.shape != candidate.vectors.shape:
            return False, 0.0
        cosines = np.sum(stable.vectors * candidate.vectors, axis=1)  # both unit length
        return bool(np.all(cosines >= EMBEDDING_AGREEMENT)), float(np.mean(cosines))
    if isinstance(stable, TextScores):
        a, b = np.asarray(stable.scores), np.asarray(candidate.scores)
        if a.shape != b.shape or not a.size:
            return False, 0.0
        return bool(np.argmax(a) == np.argmax(b)), rank_correlation(a, b)
    if isinstance(stable, TextRanking):
        same = bool(stable.labels and candidate.labels and stable.labels[0][0] == candidate.labels[0][0])
        scores = dict(candidate.labels)
        if set(scores) != {label for label, _ in stable.labels}:
            return same, 0.0
        a = np.array([score for _, score in stable.labels])
        b = np.array([scores[label] for label, _ in stable.labels])
        return same, rank_correlation(a, b)
    same = bool(stable.labels and candidate.labels and stable.labels[0][0] == candidate.labels[0][0])
    if stable.probs.shape != candidate.probs.shape:
        return same, 0.0
    return same, rank_correlation(stable.probs, candidate.probs)


VARIANT_MODELS = {
    "vision": "VisionClassifier",
    "text": "TextEncoder",
    "llm": "TextGenerator",
    "ocr": "TextReader",
    "asr": "SpeechRecognizer",
    "tts": "SpeechSynthesizer",
}
"""The models that can have a candidate, and the deployment a candidate application serves each from."""


UNCOMPARED = {"tts": "two voices' audio has no measure of agreement here"}
"""Models whose candidate can be a canary but not a shadow: nothing to compare its answers by."""


def check_models(rollouts: dict[str, Rollout]) -> None:
    unknown = sorted(set(rollouts) - set(VARIANT_MODELS))
    if unknown:
        raise ValueError(f"rollouts names models without variants {unknown}; a candidate can serve: "
                         f"{sorted(VARIANT_MODELS)}")  # fmt: skip
    for model, rollout in rollouts.items():
        if rollout.mode == "shadow" and model in UNCOMPARED:
            raise ValueError(f"rollouts.{model}.mode: shadow compares the answers, and {UNCOMPARED[model]}; "
                             "use canary")  # fmt: skip


def deployment_of(model: str, rollout: Rollout) -> str:
    return rollout.deployment or VARIANT_MODELS[model]


def check_candidates(rollouts: dict[str, Rollout]) -> None:
    """``ValueError`` naming the field when a rollout's candidate is not a deployment Serve knows."""
    if not rollouts:
        return
    applications = serve_status().applications
    for model, rollout in rollouts.items():
        application = applications.get(rollout.candidate)
        deployment = deployment_of(model, rollout)
        if application is None:
            raise ValueError(f"rollouts.{model}.candidate: no Serve application named {rollout.candidate!r} "
                             f"(applications: {sorted(applications)})")  # fmt: skip
        if application.deployments and deployment not in application.deployments:
            raise ValueError(f"rollouts.{model}.deployment: the application {rollout.candidate!r} has no deployment "
                             f"{deployment!r} (it has {sorted(application.deployments)})")  # fmt: skip


def bucket(model: str, caller: str) -> float:
    """Where a caller falls in [0, 100) for a model's split: the same caller, the same place, every replica."""
    digest = hashlib.sha256(f"{model}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


@dataclass
class RoutedCall:
    """A model call's answer and the variant that gave it (``fell_back``: the stable variant, after the canary
    candidate failed the call; counted as the candidate's failure)."""

    result: object
    variant: str
    pinned: bool
    fell_back: bool = False


class Rollouts:
    """An ingress replica's rollouts: the candidates' handles, what the judge decided, and this replica's counts
    (sent to the judge every ``SYNC_S``)."""

    def __init__(self, judge: DeploymentHandle | None = None, metrics=None, clock=time.monotonic):
        self.judge, self.metrics, self.clock = judge, metrics, clock
        self.configs: dict[str, Rollout] = {}
        self.configured_at = time.time()
        self.candidates: ModelRegistry = ModelRegistry({})
        self.serving: dict[str, dict] = {}  # model -> {"mode", "weight"}: the judge's last word
        self.ready: dict[str, bool] = {}
        self.windows: dict[str, dict[str, Window]] = {}
        self.shadows_in_flight: dict[str, int] = {}
        self._shadow_tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self.update_error: str | None = None  # why the last change of the configuration was refused

    def configure(self, rollouts: dict[str, Rollout]) -> None:
        if rollouts == self.configs:
            return
        handles = {model: serve.get_deployment_handle(deployment_of(model, r), app_name=r.candidate)
                   for model, r in rollouts.items()}  # fmt: skip
        self.configs, self.configured_at = dict(rollouts), time.time()
        self.candidates = ModelRegistry(handles)
        # Until the judge answers: the configuration as written, for a candidate found ready.
        self.serving = {model: {"mode": r.mode, "weight": r.weight} for model, r in rollouts.items()}
        self.ready = {model: False for model in rollouts}
        self.windows = {model: {variant: Window() for variant in VARIANTS} for model in rollouts}
        if rollouts and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    # --- per request ---------------------------------------------------------------------------

    def mode(self, model: str) -> str:
        serving = self.serving.get(model)
        return serving["mode"] if serving and self.ready.get(model) else "off"

    def copies(self, model: str) -> bool:
        """Whether the current request, answered by the stable variant, is copied to the candidate."""
        return self.mode(model) == "shadow" and random.random() * 100 < self.configs[model].shadow_percent

    def variant(self, model: str) -> tuple[str, bool]:
        """The variant that answers the current request for ``model``, and whether the request pinned it."""
        used = usage.current()
        pinned = used.pin if used is not None else None
        if model not in self.configs:
            return "stable", False
        if pinned is not None:
            if pinned == "candidate" and not self.ready.get(model):
                raise ModelUnavailable(f"the {model} candidate has no ready replica; retry later")
            return pinned, True
        serving = self.serving[model]
        if self.mode(model) != "canary" or serving["weight"] <= 0:
            return "stable", False
        caller = used.caller if used is not None else None
        place = bucket(model, caller) if caller else random.random() * 100
        return ("candidate" if place < serving["weight"] else "stable"), False

    def answered(self, model: str, variant: str, seconds: float, result, judged: bool = True) -> None:
        """Count an answer (``judged``: in the windows the judge decides on; a pinned request is not)."""
        value = confidence(result)
        if judged and model in self.windows:
            self.windows[model][variant].answered(seconds, value)
        if self.metrics is not None:
            self.metrics.answered(model, variant, seconds, value)

    def failed(self, model: str, variant: str, judged: bool = True) -> None:
        if judged and model in self.windows:
            self.windows[model][variant].failed()
        if self.metrics is not None:
            self.metrics.failed(model, variant)

    def shadow(self, model: str, stable_result, send: Callable) -> None:
        """Copy a request the stable variant answered to the candidate, if its shadow budget allows."""
        used = usage.current()
        if used is not None and used.masker is not None:
            return  # personal data: used for its own answer only
        if self.shadows_in_flight.get(model, 0) >= self.configs[model].shadow_in_flight:
            self.windows[model]["candidate"].dropped += 1
            if self.metrics is not None:
                self.metrics.drop(model)
            return
        self.shadows_in_flight[model] = self.shadows_in_flight.get(model, 0) + 1
        task = asyncio.get_running_loop().create_task(self._shadow(model, stable_result, send))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, model: str, stable_result, send: Callable) -> None:
        start = self.clock()
        try:
            result = await asyncio.wait_for(send(), SHADOW_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the candidate's failure, counted; the caller has its answer
            self.failed(model, "candidate")
            return
        finally:
            self.shadows_in_flight[model] -= 1
        self.answered(model, "candidate", self.clock() - start, result)
        if hasattr(result, "variant"):
            result.variant = "candidate"
        same, rho = compare(stable_result, result)
        if model in self.windows:
            self.windows[model]["candidate"].compare(same, rho)
        if self.metrics is not None:
            self.metrics.compared(model, same, rho)

    async def routed(self, model: str, send: Callable[[str], Awaitable]) -> "RoutedCall":
        """``send(variant)``'s answer from the variant the request's rollout picks for ``model``, named in the
        request's usage. A canary candidate's failure is counted and the stable variant answers instead; a
        pinned request gets the variant's own answer, errors included."""
        variant, pinned = self.variant(model)
        used = usage.current()
        if used is not None:
            used.variants[model] = variant
        try:
            return RoutedCall(await send(variant), variant, pinned)
        except Exception as exc:
            error = api_error(exc)
            if error is not None and error.status_code < 500:
                raise  # the request's own fault: the stable variant would refuse it too
            self.failed(model, variant, judged=not pinned)
            if variant == "stable" or pinned:
                raise
            logger.warning("rollouts: the %s candidate failed a request (%s); the stable variant answers it",
                           model, type(exc).__name__)  # fmt: skip
            if used is not None:
                used.variants[model] = "stable"
            return RoutedCall(await send("stable"), "stable", pinned, fell_back=True)

    async def followed(
        self,
        model: str,
        call: "RoutedCall",
        start: float,
        chunks: AsyncIterator,
        copy: Callable | None = None,
        text: Callable = lambda chunk: chunk.text,
    ) -> AsyncIterator:
        """A streamed answer's chunks (``text`` gives each one's text), counted for its variant once the stream
        ends (a failure mid-stream against it; a caller hanging up, neither). ``copy`` (None: not comparable)
        sends the request to the candidate for the whole text it answers, compared with the stable variant's in
        shadow mode."""
        parts = []
        try:
            async for chunk in chunks:
                parts.append(text(chunk))
                yield chunk
        except Exception:
            if not call.fell_back:
                self.failed(model, call.variant, judged=not call.pinned)
            raise
        finally:
            await chunks.aclose()
        if call.fell_back:
            return
        self.answered(model, call.variant, self.clock() - start, None, judged=not call.pinned)
        if copy is not None and call.variant == "stable" and not call.pinned and self.copies(model):
            self.shadow(model, "".join(parts), copy)

    async def summary(self, deadline) -> dict[str, dict]:
        """Per model with a rollout: its candidate, the mode and weight routed by, and what a ready candidate
        serves (``GET /v1/models``)."""
        ready = ModelRegistry({model: self.candidates[model] for model in self.configs if self.ready.get(model)})
        served = {info["deployment"]: info for info in await ready.infos(deadline)} if len(ready) else {}
        return {
            model: {
                "candidate": rollout.candidate,
                "mode": self.mode(model),
                "weight": self.serving[model]["weight"] if self.mode(model) == "canary" else 0.0,
                "ready": bool(self.ready.get(model)),
                "name": served.get(model, {}).get("name"),
                "version": served.get(model, {}).get("version"),
            }
            for model, rollout in self.configs.items()
        }

    # --- with the judge ------------------------------------------------------------------------

    async def call_judge(self, method: str, *args):
        """Ask the judge (``describe``, ``act``); ``ModelUnavailable`` if there is none or it does not answer."""
        if self.judge is None:
            raise ModelUnavailable("this application has no rollouts judge")
        try:
            return await asyncio.wait_for(getattr(self.judge, method).remote(*args), JUDGE_TIMEOUT_S * 2)
        except TimeoutError:
            raise ModelUnavailable("the rollouts judge did not answer; retry") from None

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - keep routing by the last answer; try again
                logger.warning("rollouts: the judge did not answer (%s); routing as before", type(exc).__name__)
            await asyncio.sleep(SYNC_S)

    async def sync(self) -> None:
        """Check the candidates' readiness, send this replica's counts to the judge, route by its answer (with no
        rollouts left, the report tells the judge so)."""
        readiness = await self.candidates.ready(1.0)
        self.ready = {model: readiness[model].ready for model in self.configs}
        versions = {model: readiness[model].version for model in self.configs}
        counts = {model: {v: w.as_dict() for v, w in windows.items() if not w.empty()}
                  for model, windows in self.windows.items()}  # fmt: skip
        configs = {model: rollout.model_dump() for model, rollout in self.configs.items()}
        sent = self.windows
        self.windows = {model: {variant: Window() for variant in VARIANTS} for model in self.configs}
        if self.judge is None:
            return
        try:
            answer = await asyncio.wait_for(
                self.judge.report.remote(configs, self.configured_at, counts, self.ready, versions), JUDGE_TIMEOUT_S
            )
        except BaseException:
            for model, windows in sent.items():  # counted next time instead
                for variant, window in windows.items():
                    if model in self.windows:
                        self.windows[model][variant].merge(window)
            raise
        self.serving.update({model: answer[model] for model in self.configs if model in answer})


class Routed:
    """One model method's calls, each sent to the variant the request's rollout picks, and in shadow mode copied
    to the candidate. ``sender(variant)`` makes the function that sends one call's item to that variant; with
    ``grouped`` (vision) concurrent requests' calls go out together, as before (``pipelines.grouping``)."""

    def __init__(self, model: str, rollouts: Rollouts, sender: Callable[[str], Callable], grouped: bool = True):
        self.model, self.rollouts = model, rollouts
        self.calls = {variant: Grouped(sender(variant)) if grouped else sender(variant) for variant in VARIANTS}

    def configure(self, max_group_size: int, max_groups_in_flight: int) -> None:
        for calls in self.calls.values():
            if isinstance(calls, Grouped):
                calls.configure(max_group_size, max_groups_in_flight)

    async def stable(self, item):
        """A call the stable variant answers whatever the rollout (for a caller bound to the stable deployment)."""
        return await self.calls["stable"](item)

    async def __call__(self, item):
        if self.model not in self.rollouts.configs:
            return await self.calls["stable"](item)
        start = self.rollouts.clock()
        call = await self.rollouts.routed(self.model, lambda variant: self.calls[variant](item))
        if call.fell_back:
            return call.result
        self.rollouts.answered(self.model, call.variant, self.rollouts.clock() - start, call.result,
                               judged=not call.pinned)  # fmt: skip
        if hasattr(call.result, "variant"):
            call.result.variant = call.variant
        if call.variant == "stable" and not call.pinned and self.rollouts.copies(self.model):
            self.rollouts.shadow(self.model, call.result, lambda: self.calls["candidate"](item))
        return call.result
