"""Saliency maps of an image classifier (plain PyTorch and Captum; no Ray): the explainer deployment's image half
(``deployments.explainer``), and the faithfulness benchmark's.

Its own module so that what imports the deployment (the application's build, a replica before it loads)
does not import PyTorch: the explainer's replicas import it here when they load their model.
"""

import difflib
import io
import math
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deployments.contracts import IMAGE_METHODS, ImageExplanation
from deployments.errors import ExplanationTimeout, InvalidInput
from deployments.vision import VisionConfig, VisionModel

BASELINE = "the dataset's mean colour (zeros after normalisation)"
HEATMAP_ALPHA = 0.5  # the heatmap's weight over the image in the overlay
IG_BATCH = 8  # Integrated Gradients' steps per forward pass


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

    @property
    def feature_map(self) -> str:
        """The name of the layer Grad-CAM reads, as ``GET /v1/models`` shows it."""
        return _layer_name(self.vision.model, self.layer)

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
