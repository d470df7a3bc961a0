"""Reading text in images (OCR) and its Serve deployment.

``OcrModel`` is RapidOCR's PP-OCRv4 pipeline (text detection, direction classification, recognition: three
ONNX models shipped in ``rapidocr-onnxruntime``) on ONNX Runtime with one intra-op thread. ``TextReader`` is
the Serve deployment: it gathers concurrent images with ``@serve.batch`` and reads them together.

Batching, and why a batch reads exactly as single images do
-----------------------------------------------------------
Detection runs per image (images differ in size). The crops of every detected line are then classified and
recognised together, across the images of the batch: about 20% less time for 8 images than one at a time
on one thread. RapidOCR's recogniser pads each group of crops to the widest crop of the group, and the
padding changes what it reads (a word space, a few hundredths of confidence), so its answer for a line
would depend on which other lines shared its forward pass. Here a crop whose width fits the recogniser's
base width (320 px at 48 px high, where every crop is padded to the same width) is recognised with any
others, and a wider line alone: a line reads the same whatever else is in the batch.

Reading order is RapidOCR's: top to bottom, then left to right for boxes within 10 px of each other.
"""

import asyncio
import hashlib
import logging
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contracts import OcrLine, OcrResult
from deployments.errors import InvalidImage
from deployments.runtime import LiveModelDeployment, ModelSettings, package_dir, package_version
from monitoring.drift import DriftConfig
from monitoring.metrics import OcrMetrics

logger = logging.getLogger("ray.serve")

PACKAGED_ENGINE = "package:rapidocr_onnxruntime"
MODEL_FILES = ("ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx")


class OcrConfig(BaseModel):
    """Which OCR engine to serve and how. ``source`` is the installed package whose models are read
    (``package:rapidocr_onnxruntime``: PP-OCRv4 detection and recognition, the only engine today)."""

    model_config = ConfigDict(extra="forbid")

    source: str = PACKAGED_ENGINE
    name: str | None = Field(None, description="Name reported by the API (default PP-OCRv4).")
    version: str | None = Field(None, description="Overrides the derived version string.")
    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="Lines read with less confidence are dropped.")
    single_character_confidence: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="A line of one character needs this much: round shapes in photos (a cat's eye) read as 'O' "
        "with confidence up to about 0.6.",
    )
    max_lines: int = Field(200, ge=1, le=1000, description="Lines read per image, the first in reading order.")
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads.")


class OcrModel:
    """RapidOCR's pipeline with batch-independent recognition (see the module docstring)."""

    def __init__(self, config: OcrConfig):
        if config.source != PACKAGED_ENGINE:
            raise ValueError(f"unknown OCR source {config.source!r}; the supported one is {PACKAGED_ENGINE!r}")
        from rapidocr_onnxruntime import RapidOCR

        module = PACKAGED_ENGINE.removeprefix("package:")
        self.config = config
        self.engine = RapidOCR(intra_op_num_threads=config.threads, inter_op_num_threads=1)
        self.name = config.name or "PP-OCRv4"
        self.version = config.version or f"{package_version(module)}/{_models_digest(package_dir(module))}"
        self.device = "cpu"
        _, height, width = self.engine.text_rec.rec_image_shape
        self._base_ratio = width / height  # crops at most this wide for their height all pad to the same width

    def read(self, images: list[np.ndarray]) -> list[OcrResult]:
        """The lines of each ``(H, W, 3)`` uint8 RGB image, in reading order, with boxes in its pixels."""
        start = time.perf_counter()
        crops, owners, truncated = [], [], []  # owners: (image index, box) of each crop
        limit = self.config.max_lines
        for index, image in enumerate(images):
            boxes, image_crops = self._detect(image)
            truncated.append(len(boxes) > limit)
            crops += image_crops[:limit]
            owners += [(index, box) for box in boxes[:limit]]
        lines: list[list[OcrLine]] = [[] for _ in images]
        for (index, box), (text, confidence) in zip(owners, self._recognise(crops)):
            if self._keeps(text.strip(), confidence):
                points = [(round(float(x), 1), round(float(y), 1)) for x, y in box]
                lines[index].append(OcrLine(text=text, confidence=confidence, box=points))
        seconds = (time.perf_counter() - start) / max(1, len(images))
        return [
            OcrResult(lines=found, truncated=cut, model=self.name, version=self.version, seconds=seconds)
            for found, cut in zip(lines, truncated)
        ]

    def _detect(self, image: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Line boxes in the image's own pixels (reading order) and the upright crop of each line."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidImage("OCR takes (height, width, 3) uint8 RGB pixels", field="image")
        engine = self.engine
        image = np.ascontiguousarray(image[:, :, ::-1])  # BGR, as RapidOCR hands its models a decoded file
        height, width = image.shape[:2]
        resized, ratio_h, ratio_w = engine.preprocess(image)
        steps = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        padded, steps = engine.maybe_add_letterbox(resized, steps)
        boxes, _ = engine.auto_text_det(padded)
        if boxes is None:
            return [], []
        crops = engine.get_crop_img_list(padded, boxes)
        return list(engine._get_origin_points(boxes, steps, height, width)), crops

    def _recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Text and confidence of each crop, read upright; independent of the other crops (module docstring)."""
        if not crops:
            return []
        crops, _, _ = self.engine.text_cls(crops)
        narrow = [crop.shape[1] / crop.shape[0] <= self._base_ratio for crop in crops]
        groups = [[i for i, fits in enumerate(narrow) if fits]] if any(narrow) else []
        groups += [[i] for i, fits in enumerate(narrow) if not fits]
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for group in groups:
            read, _ = self.engine.text_rec([crops[i] for i in group])
            for i, (text, confidence, *_) in zip(group, read):
                results[i] = (text, float(confidence))
        return results

    def _keeps(self, text: str, confidence: float) -> bool:
        needed = self.config.single_character_confidence if len(text) == 1 else self.config.min_confidence
        return bool(text) and confidence >= max(needed, self.config.min_confidence)


def _models_digest(folder) -> str:
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update((folder / "models" / name).read_bytes())
    return digest.hexdigest()[:12]


class OcrSettings(ModelSettings):
    """``TextReader``'s ``user_config``: the engine, its limits and its batching, all live."""

    model: OcrConfig = Field(default_factory=OcrConfig)
    # No reference profile exists for text read from images; enable with one of your own (monitoring/README.md).
    drift: DriftConfig = Field(default_factory=lambda: DriftConfig(enabled=False))


@serve.deployment(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.05}, user_config={})
class TextReader(LiveModelDeployment):
    """Serve deployment of ``OcrModel``: images gathered across callers are read in one batch.

    Takes ``(H, W, 3)`` uint8 RGB pixels at most ``imaging.OCR_MAX_SIDE_PX`` on the long side: the ingress
    decodes and bounds the upload and sends the pixels only. Each image's time and lines are measured.
    """

    settings_type = OcrSettings
    task = "ocr"

    def __init__(self, start_after: DeploymentHandle | None = None):
        super().__init__(start_after)
        self.ocr_metrics = OcrMetrics(model="", version="")

    def model_swapped(self, model: OcrModel) -> None:
        self.ocr_metrics.set_model(model.name, model.version)

    def load_model(self, config: OcrConfig) -> OcrModel:
        return OcrModel(config)

    def _load(self, config: OcrConfig) -> OcrModel:
        self.torch_threads = config.threads  # ONNX Runtime's intra-op threads; no torch here
        return self.load_model(config)

    def batch_methods(self) -> list:
        return [self._read_batch]

    def model_details(self) -> dict:
        config = self.model.config
        return {"min_confidence": config.min_confidence, "max_lines": config.max_lines, "models": list(MODEL_FILES)}

    async def read(self, image: np.ndarray) -> OcrResult:
        with self.counted():
            return await self._read_batch(image)

    @serve.batch(**OcrSettings.batch_defaults())
    async def _read_batch(self, images: list[np.ndarray]) -> list[OcrResult]:
        model = self.model
        start = time.perf_counter()
        results = await asyncio.to_thread(model.read, images)
        self.metrics.observe_batch(len(images), 0.0, time.perf_counter() - start)
        for result in results:
            result.batch_size = len(images)
            self.ocr_metrics.observe_image(result.seconds, len(result.lines))
        return results
