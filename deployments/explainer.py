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
import difflib
import io
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
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
from deployments.vision import VisionConfig, VisionModel
from deployments.words import check_words, without, words
from monitoring.metrics import ExplainerMetrics

logger = logging.getLogger("ray.serve")

BASELINE = "the dataset's mean colour (zeros after normalisation)"
HEATMAP_ALPHA = 0.5  # the heatmap's weight over the image in the overlay
IG_BATCH = 8  # Integrated Gradients' steps per forward pass
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


# --- images -----------------------------------------------------------------------------


class Budget:
    """Stops a model's work once ``seconds`` have passed: a forward pre-hook raises ``ExplanationTimeout``.

    Captum runs its passes inside one call; the hook ends that call at the next pass after the budget, or
    after ``cancelled`` is set (the caller hung up), so a request that gave up stops costing CPU within one
    pass. The 504 says how many of the ``planned`` forward passes ran.
    """

    def __init__(self, module: torch.nn.Module, seconds: float, planned: int, cancelled: threading.Event):
        self.seconds = seconds
        self.planned = planned
        self.passes = 0
        self.deadline = time.monotonic() + seconds
        self._cancelled = cancelled
        self._handle = module.register_forward_pre_hook(self._check)

    def _check(self, _module, _inputs) -> None:
        if self._cancelled.is_set() or time.monotonic() > self.deadline:
            raise ExplanationTimeout(
                f"the explanation took longer than its budget of {self.seconds:g} s; it was stopped after "
                f"{self.passes} of its {self.planned} forward passes"
            )
        self.passes += 1

    def close(self) -> None:
        self._handle.remove()


def spatial_layer(model: torch.nn.Module, crop: int) -> torch.nn.Module:
    """The module whose output is the network's last spatial feature map (``(B, C, H, W)`` with H, W > 1):
    the last module to finish with such an output in a forward pass (for MobileNetV2 ``features``, 7 x 7)."""
    found: list[torch.nn.Module] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[2:]) > 1:
            found.append(module)

    hooks = [module.register_forward_hook(record) for module in model.modules() if module is not model]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, crop, crop, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ValueError("the vision model has no spatial feature map for Grad-CAM")
    return found[-1]


class _Logits(torch.nn.Module):
    """The classifier's logits as a plain tensor (Hugging Face models return an output object)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return getattr(out, "logits", out)


class ImageExplainer:
    """Saliency maps of one ``VisionModel`` (plain torch and Captum; no Ray), used by the deployment and the
    faithfulness benchmark alike."""

    def __init__(self, vision: VisionModel):
        from captum.attr import IntegratedGradients, LayerGradCam

        self.vision = vision
        self.net = _Logits(vision.model)
        self.layer = spatial_layer(vision.model, vision.spec.crop_size)
        self._gradcam = LayerGradCam(self.net, self.layer)
        self._ig = IntegratedGradients(self.net)
        self._lock = threading.Lock()  # one explanation at a time per replica: the model's hooks are shared

    @classmethod
    def load(cls, config: VisionConfig) -> "ImageExplainer":
        """The explainer of the model ``config`` describes, on PyTorch whatever its ``runtime`` (gradients)."""
        return cls(VisionModel(config, runtime="torch"))

    def warm_up(self) -> None:
        """Run each method once on a blank crop, so that no request pays for the first passes with gradients
        (the kernels' one-time set-up: 1.8 s on top of a 0.4 s explanation in a replica on two cores, and no
        budget can stop it inside one pass)."""
        crop = self.vision.spec.crop_size
        blank = np.zeros((crop, crop, 3), np.uint8)
        for method in IMAGE_METHODS:
            self.explain(blank, None, method, IG_BATCH, budget_s=600.0)

    def target(self, label: str | None, probs: np.ndarray) -> int:
        """The class to explain: the top one, or the one named (case-insensitive); unknown: 422 with close
        matches."""
        if label is None:
            return int(np.argmax(probs))
        names = self.vision.categories
        folded = [name.casefold() for name in names]
        if label.casefold() in folded:
            return folded.index(label.casefold())
        close = difflib.get_close_matches(label.casefold(), folded, n=3, cutoff=0.6)
        hint = f"; close: {', '.join(repr(names[folded.index(c)]) for c in close)}" if close else ""
        raise InvalidInput(
            f"unknown class: the model {self.vision.name} has {len(names)} classes (GET /v1/models){hint}",
            field="label",
        )

    @staticmethod
    def planned_passes(method: str, steps: int) -> int:
        """Forward passes of one explanation: the one that finds the class, then Grad-CAM's one or Integrated
        Gradients' batches of ``IG_BATCH`` steps."""
        return 1 + (math.ceil(steps / IG_BATCH) if method == "integrated_gradients" else 1)

    def saliency(self, batch: torch.Tensor, target: int, method: str, steps: int) -> np.ndarray:
        """A ``(crop, crop)`` map in [0, 1] (its maximum 1, unless the model's gradient was 0 everywhere)."""
        size = batch.shape[2:]
        if method == "gradcam":
            cam = self._gradcam.attribute(batch, target=target, relu_attributions=True)
            heat = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
        elif method == "integrated_gradients":
            attributions = self._ig.attribute(
                batch, baselines=torch.zeros_like(batch), target=target, n_steps=steps, internal_batch_size=IG_BATCH
            )
            heat = attributions[0].abs().sum(0)
        else:
            raise InvalidInput(f"unknown method; the methods are: {', '.join(IMAGE_METHODS)}", field="method")
        heat = heat.detach().float().cpu().numpy()
        peak = float(heat.max())
        return (heat / peak if peak > 0 else np.zeros_like(heat)).astype(np.float32)

    def explain(
        self, pixels: np.ndarray, label: str | None, method: str, steps: int, budget_s: float,
        cancelled: threading.Event | None = None,
    ) -> ImageExplanation:  # fmt: skip
        """Explain the class ``label`` (None: the top class) of one prepared ``(crop, crop, 3)`` image; stop
        with ``ExplanationTimeout`` past ``budget_s`` or once ``cancelled`` is set."""
        start = time.perf_counter()
        vision = self.vision
        with self._lock:
            budget = Budget(vision.model, budget_s, self.planned_passes(method, steps), cancelled or threading.Event())
            try:
                batch = vision.preprocess([pixels]).clone()  # out of inference mode, for autograd
                with torch.no_grad():
                    probs = torch.softmax(self.net(batch).float(), dim=1)[0].cpu().numpy()
                target = self.target(label, probs)
                heat = self.saliency(batch, target, method, steps)
            finally:
                budget.close()
        parameters = {"layer": _layer_name(vision.model, self.layer)} if method == "gradcam" else {
            "steps": steps, "baseline": BASELINE}  # fmt: skip
        return ImageExplanation(
            saliency=heat,
            class_index=target,
            class_name=vision.categories[target],
            probability=float(probs[target]),
            method=method,
            parameters=parameters,
            model=vision.name,
            version=vision.version,
            seconds=time.perf_counter() - start,
        )


def _layer_name(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next((name for name, module in model.named_modules() if module is layer), type(layer).__name__)


def grid(saliency: np.ndarray, size: int) -> np.ndarray:
    """The map's mass in ``size`` x ``size`` cells, each cell's share of the whole (the cells sum to 1; all 0
    for an empty map)."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(saliency)[None, None], size)[0, 0].numpy().astype(np.float64)
    total = pooled.sum()
    return (pooled / total if total > 0 else pooled).astype(np.float32)


def heatmap_png(pixels: np.ndarray, saliency: np.ndarray) -> bytes:
    """The map in colour (matplotlib's ``jet``: blue low, red high) over the crop, as a PNG."""
    from matplotlib import colormaps

    colours = colormaps["jet"](saliency)[..., :3] * 255.0
    blended = (1.0 - HEATMAP_ALPHA) * pixels.astype(np.float32) + HEATMAP_ALPHA * colours
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


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

    def __init__(self, text: DeploymentHandle):
        super().__init__()
        self.text = text
        self.images: ImageExplainer | None = None
        self.torch_threads = 0
        self.explained = ExplainerMetrics()

    async def prepare(self, settings: ExplainerSettings) -> ImageExplainer:
        if self.images is not None and settings.model == self.images.vision.config:
            return self.images
        return await asyncio.to_thread(self._load, settings.model)

    def _load(self, config: VisionConfig) -> ImageExplainer:
        self.torch_threads = configure_threads(config.torch_threads)
        images = ImageExplainer.load(config)
        images.warm_up()  # before the replica takes requests
        crop = images.vision.spec.crop_size
        heatmap_png(np.zeros((crop, crop, 3), np.uint8), np.zeros((crop, crop), np.float32))  # matplotlib's import
        return images

    def commit(self, images: ImageExplainer) -> None:
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
                "feature_map": _layer_name(vision.model, self.images.layer),
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
