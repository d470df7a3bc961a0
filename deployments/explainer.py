"""Explanations: which pixels made the image classifier answer a class, which words made a text get a label.

``Explainer`` is its own Serve deployment, beside the models it explains, with its own replicas, resources,
queue limits and a time budget per explanation: one explanation costs one to a hundred forward or backward
passes, and running them on the prediction path's replicas would take those replicas' capacity from
predictions.

* **Images** need gradients, which cannot cross a deployment handle (a handle carries arrays, not an autograd
  graph), so the explainer holds its own copy of the vision model, loaded from the same ``model`` settings as
  the vision deployment (``user_config.model``; the response names the version it explained). Methods, from
  Captum (``captum.attr``):

  - ``gradcam`` (default): Grad-CAM (Selvaraju et al., 2017) on the network's last spatial feature map, one
    forward and one backward pass (about 60 ms on one core for MobileNetV2), upsampled to the crop;
  - ``integrated_gradients``: Integrated Gradients (Sundararajan et al., 2017) from a baseline of the
    dataset's mean colour, ``steps`` forward and backward passes (about 1 s for 16 steps on one core):
    per pixel, noisier.

  The map covers the centre crop the classifier sees (``imaging.prepare``), which ``region`` places in the
  upload's pixels.
* **Texts** are explained by occlusion through the text deployment's handle: each word is removed in turn
  and the label's zero-shot score is asked for again; a word's contribution is how much the score drops
  without it. No gradients, so no copy of the text model: the scores are exactly those of
  ``/v1/text/classify``.

Multimodal answers need no explainer: a ConSE score decomposes exactly into the image's class contributions,
which the fusion deployment computes from the same numbers it scores with (``deployments.fusion``).

Every explanation runs within ``budget_s``: image methods check it before every forward pass (a model hook),
texts between chunks of variants; over it, the request gets a 504 and the replica stops working on it.
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contracts import (
    DEFAULT_STEPS,
    IMAGE_METHODS,
    ImageExplanation,
    TextExplanation,
    TextRanking,
    WordContribution,
)
from deployments.downstream import SAME_VERSION_ATTEMPTS, SAME_VERSION_RETRY_S
from deployments.errors import ExplanationTimeout, InvalidInput, ModelUnavailable
from deployments.runtime import ModelDeployment, configure_threads
from deployments.vision import VisionConfig
from deployments.words import check_words, without, words
from monitoring.metrics import ExplainerMetrics

if TYPE_CHECKING:  # PyTorch and Captum: imported where a replica loads its model
    from deployments.saliency import ImageExplainer

logger = logging.getLogger("ray.serve")

TEXT_CHUNK = 16  # text variants scored at once: one batch of the text deployment, as fusion's class names


class ExplainerSettings(BaseModel):
    """``Explainer``'s ``user_config``, all live: the model it holds a copy of, and the budget per explanation."""

    model_config = ConfigDict(extra="forbid")

    model: VisionConfig = Field(
        default_factory=VisionConfig,
        description="The vision model explained: keep it equal to the VisionClassifier's `model`.",
    )
    budget_s: float = Field(
        10.0,
        gt=0.0,
        le=300.0,
        description="Time one explanation may take in the replica; over it the request gets a 504. Keep it below "
        "the ingress's request_timeout_s.",
    )


# --- texts ------------------------------------------------------------------------------


@dataclass
class _Scores:
    label: str
    full: float
    variants: list[float] = field(default_factory=list)


# --- the deployment ---------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=2, ray_actor_options={"num_cpus": 0.05}, user_config={})
class Explainer(ModelDeployment):
    """Serve deployment: saliency maps of its own copy of the vision model, and word occlusion through the
    text deployment."""

    settings_type = ExplainerSettings
    task = "explanation"

    def __init__(self, text: DeploymentHandle, start_after: DeploymentHandle | None = None):
        super().__init__(start_after)
        self.text = text
        self.images: "ImageExplainer | None" = None
        self.torch_threads = 0
        self.explained = ExplainerMetrics()

    async def prepare(self, settings: ExplainerSettings) -> "ImageExplainer":
        if self.images is not None and settings.model == self.images.vision.config:
            return self.images
        return await asyncio.to_thread(self._load, settings.model)

    def _load(self, config: VisionConfig) -> "ImageExplainer":
        from deployments.saliency import ImageExplainer, heatmap_png

        self.torch_threads = configure_threads(config.torch_threads)
        images = ImageExplainer.load(config)
        images.warm_up()  # before the replica takes requests
        crop = images.vision.spec.crop_size
        heatmap_png(np.zeros((crop, crop, 3), np.uint8), np.zeros((crop, crop), np.float32))  # matplotlib's import
        return images

    def commit(self, images: "ImageExplainer") -> None:
        if images is not self.images:
            self.images = images
            self.metrics.set_model(*self.served())
            self.explained.set_model(*self.served())
            logger.info("Explaining %s %s on %s", images.vision.name, images.vision.version, images.vision.device)

    def served(self) -> tuple[str, str]:
        vision = self.images.vision
        return f"explainer:{vision.name}", vision.version

    def describe(self) -> dict:
        vision = self.images.vision
        return {
            "source": vision.config.source,
            "device": str(vision.device),
            "torch_threads": self.torch_threads,
            "details": {
                "image_methods": list(IMAGE_METHODS),
                "text_method": "occlusion",
                "feature_map": self.images.feature_map,
                "budget_s": self.settings.budget_s,
                "explains": {"image": vision.name, "text": "through the text deployment"},
            },
            "drift": {"status": "disabled", "message": "explanations are not predictions: no drift window"},
        }

    async def explain_image(
        self,
        pixels: np.ndarray,
        label: str | None = None,
        method: str = "gradcam",
        steps: int = DEFAULT_STEPS,
        grid_size: int = 7,
        heatmap: bool = True,
    ) -> ImageExplanation:
        """A saliency map of one prepared image for the class ``label`` (None: the top class), returned as a
        ``grid_size`` grid and (with ``heatmap``) a PNG over the crop; the full map stays here."""
        with self.counted():
            images, budget_s = self.images, self.settings.budget_s
            cancelled = threading.Event()  # set when the caller hangs up: the work stops at its next pass

            def explain() -> ImageExplanation:
                from deployments.saliency import grid, heatmap_png

                result = images.explain(pixels, label, method, steps, budget_s, cancelled)
                result.grid = grid(result.saliency, grid_size)
                result.heatmap_png = heatmap_png(pixels, result.saliency) if heatmap else None
                result.saliency = None
                return result

            try:
                result = await asyncio.to_thread(explain)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            except ExplanationTimeout:
                self.explained.observe("image", method, budget_s, timed_out=True)
                raise
            self.explained.observe("image", method, result.seconds)
            return result

    async def explain_text(self, text: str, labels: list[str], label: str | None = None) -> TextExplanation:
        """Each word's contribution to ``label``'s zero-shot score (None: the top label): the score of the
        whole text minus the score without that word."""
        with self.counted():
            if label is not None and label not in labels:
                raise InvalidInput("label must be one of labels", field="label")
            check_words(text)
            start, budget_s = time.perf_counter(), self.settings.budget_s
            try:
                scores, ranking = await asyncio.wait_for(self._occlude(text, labels, label), timeout=budget_s)
            except TimeoutError:
                self.explained.observe("text", "occlusion", budget_s, timed_out=True)
                raise ExplanationTimeout(f"the explanation took longer than its budget of {budget_s:g} s") from None
            seconds = time.perf_counter() - start
            self.explained.observe("text", "occlusion", seconds)
            found = words(text)
            return TextExplanation(
                words=[
                    WordContribution(word.group(), word.start(), scores.full - score)
                    for word, score in zip(found, scores.variants)
                ],
                label=scores.label,
                score=scores.full,
                method="occlusion",
                parameters={"unit": "word (whitespace-separated)", "removal": "the word deleted from the text"},
                model=ranking.model,
                version=ranking.version,
                seconds=seconds,
            )

    async def _occlude(self, text: str, labels: list[str], label: str | None):
        whole = await self.text.classify.remote(text, labels, monitor=False)
        scores = dict(whole.labels)
        chosen = label if label is not None else whole.labels[0][0]
        result = _Scores(chosen, scores[chosen])
        variants = [without(text, word) for word in words(text)]
        # A chunk at a time, one after the other: every text of a chunk joins the text replica's batch queue,
        # and live requests arriving meanwhile wait behind at most one chunk.
        for begin in range(0, len(variants), TEXT_CHUNK):
            chunk = variants[begin : begin + TEXT_CHUNK]
            rankings = await asyncio.gather(*(self._score(variant, labels, whole.version) for variant in chunk))
            result.variants.extend(dict(ranking.labels)[chosen] for ranking in rankings)
        return result, whole

    async def _score(self, variant: str, labels: list[str], version: str):
        """The variant's ranking by the text version that ranked the whole text: during a live update the two
        versions' scores would not compare. An empty variant (the text was one word) scores every label alike."""
        if not variant:
            return TextRanking(labels=[(label, 1.0 / len(labels)) for label in labels], model="", version=version)
        for _ in range(SAME_VERSION_ATTEMPTS):
            ranking = await self.text.classify.remote(variant, labels, monitor=False)
            if ranking.version == version:
                return ranking
            await asyncio.sleep(SAME_VERSION_RETRY_S)
        raise ModelUnavailable(f"text model version {version} is no longer served; retry", retryable=True)
