"""Cross-modal scoring: ConSE for the image, similarity for the text, weighted late fusion.

The fusion deployment holds the text embeddings of the vision model's class
names, computed once per replica at start-up through the text deployment, and
scores any free-text labels against an image (ConSE), a text, or both.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.errors import InvalidInput
from deployments.runtime import BatchingConfig, replica_info
from deployments.scoring import (
    DEFAULT_CONSE_TOP_T,
    DEFAULT_TEMPERATURE,
    conse_embedding,
    late_fusion,
    similarity_scores,
)
from deployments.text import TextEmbeddings
from deployments.vision import VisionResult
from monitoring.metrics import ModelMetrics

logger = logging.getLogger("ray.serve")

NAME = "conse-late-fusion"
METHOD = "ConSE (Norouzi et al., 2014) image-to-text projection + weighted late fusion"


class FusionConfig(BaseModel):
    """How labels are scored and fused. Live-tunable through ``user_config``."""

    model_config = ConfigDict(extra="forbid")

    vision_weight: float = Field(0.5, ge=0.0, description="Late-fusion weight of the image's scores.")
    text_weight: float = Field(0.5, ge=0.0, description="Late-fusion weight of the text's scores.")
    top_t: int = Field(DEFAULT_CONSE_TOP_T, ge=1, le=1000, description="ConSE: classes combined.")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0.0, description="Softmax temperature.")
    class_prompt: str = Field(
        "{}",
        description="Template that turns a class name into the text embedded for ConSE. The bare "
        "name works best: a shared template ('a photo of a {}') makes every class look alike.",
    )
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.002, ge=0.0, le=1.0)

    @field_validator("class_prompt")
    @classmethod
    def _has_slot(cls, prompt: str) -> str:
        if prompt.count("{}") != 1:
            raise ValueError("class_prompt must contain exactly one '{}' where the class name goes")
        return prompt

    @model_validator(mode="after")
    def _some_weight(self) -> "FusionConfig":
        if self.vision_weight + self.text_weight <= 0:
            raise ValueError("vision_weight and text_weight cannot both be 0")
        return self

    @property
    def batching(self) -> BatchingConfig:
        return BatchingConfig(max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s)


@dataclass
class FusionInput:
    vision: VisionResult | None
    label_embeddings: np.ndarray  # (L, D)
    text_embedding: np.ndarray | None  # (D,)
    weights: dict[str, float]


@dataclass
class FusionResult:
    vision_scores: np.ndarray | None  # (L,) ConSE scores of the labels against the image
    text_scores: np.ndarray | None  # (L,) scores of the labels against the text
    fused: np.ndarray  # (L,)
    weights: dict[str, float]


def fuse(batch: list[FusionInput], class_embeddings: np.ndarray, config: FusionConfig) -> list[FusionResult]:
    """Score and fuse a batch; the ConSE projection of all images is one matrix product."""
    with_image = [i for i, item in enumerate(batch) if item.vision is not None]
    image_embeddings = {}
    if with_image:
        probs = np.stack([batch[i].vision.probs for i in with_image])
        projected = conse_embedding(probs, class_embeddings, config.top_t)
        image_embeddings = dict(zip(with_image, projected))

    results = []
    for i, item in enumerate(batch):
        scores = {}
        if i in image_embeddings:
            scores["vision"] = similarity_scores(image_embeddings[i], item.label_embeddings, config.temperature)
        if item.text_embedding is not None:
            scores["text"] = similarity_scores(item.text_embedding, item.label_embeddings, config.temperature)
        total = sum(item.weights[name] for name in scores)
        weights = {name: item.weights[name] / total for name in scores}  # as applied
        results.append(
            FusionResult(
                vision_scores=scores.get("vision"),
                text_scores=scores.get("text"),
                fused=late_fusion(scores, weights),
                weights=weights,
            )
        )
    return results


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1})
class FusionScorer:
    """Serve deployment: ConSE scoring and late fusion over the other models' outputs."""

    async def __init__(self, vision: DeploymentHandle, text: DeploymentHandle):
        self.config = FusionConfig()
        class_names = await vision.class_names.remote()
        prompts = [self.config.class_prompt.format(name) for name in class_names]
        self.class_embeddings = (await text.embed.remote(prompts, monitor=False)).vectors
        logger.info("Fusion ready: %d class-name embeddings precomputed", len(prompts))
        self._text = text
        self._class_names = class_names
        self.metrics = ModelMetrics(NAME, self.version)

    async def reconfigure(self, user_config: dict) -> None:
        config = FusionConfig.model_validate(user_config or {})
        if config.class_prompt != self.config.class_prompt:
            prompts = [config.class_prompt.format(name) for name in self._class_names]
            self.class_embeddings = (await self._text.embed.remote(prompts, monitor=False)).vectors
        self.config = config
        config.batching.apply(self._fuse_batch)
        self.metrics.set_model(NAME, self.version)

    @property
    def version(self) -> str:
        return f"conse-top{self.config.top_t}"

    async def info(self) -> dict:
        return replica_info(
            name=NAME,
            task="cross-modal-scoring",
            source="text embeddings of the vision model's class names",
            version=self.version,
            device="cpu",
            torch_threads=0,
            details={"method": METHOD, **self.config.model_dump()},
            drift={
                "status": "disabled",
                "message": "fusion keeps no reference profile: drift is watched on its inputs, "
                "by the vision and text deployments",
            },
        )

    async def fuse(
        self,
        vision: VisionResult | None,
        embeddings: TextEmbeddings,
        with_text: bool,
        vision_weight: float | None = None,
        text_weight: float | None = None,
    ) -> FusionResult:
        """Fuse one request. ``embeddings`` holds the labels' embeddings, then the text's if any."""
        weights = {
            "vision": self.config.vision_weight if vision_weight is None else vision_weight,
            "text": self.config.text_weight if text_weight is None else text_weight,
        }
        present = ["vision"] * (vision is not None) + ["text"] * with_text
        if sum(weights[name] for name in present) <= 0:
            self.metrics.errors.inc(tags={"error_type": InvalidInput.__name__})
            raise InvalidInput(
                f"the fusion weights of the modalities sent ({', '.join(present)}) sum to 0; "
                "give at least one of them a positive weight",
                field=f"{present[0]}_weight",
            )
        vectors = embeddings.vectors
        item = FusionInput(
            vision=vision,
            label_embeddings=vectors[:-1] if with_text else vectors,
            text_embedding=vectors[-1] if with_text else None,
            weights=weights,
        )
        return await self._fuse_batch(item)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _fuse_batch(self, items: list[FusionInput]) -> list[FusionResult]:
        start = time.perf_counter()
        results = await asyncio.to_thread(fuse, items, self.class_embeddings, self.config)
        self.metrics.observe_batch(len(items), 0.0, time.perf_counter() - start)
        for result in results:
            # Labels are free text, so the class index is the winner's position in the request.
            best = int(np.argmax(result.fused))
            self.metrics.observe_prediction(best, float(result.fused[best]))
        return results
