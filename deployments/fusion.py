"""Cross-modal scoring: ConSE for the image, similarity for the text, weighted late fusion.

The fusion deployment holds the text embeddings of the vision model's class
names, computed at start-up through the text deployment (or read from the model
cache, where an earlier start or ``make install`` kept them), and scores any
free-text labels against an image (ConSE), a text, or both.
"""

import asyncio
import hashlib
import io
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contracts import FusionExplanation, FusionInput, FusionResult, TextEmbeddings, VisionResult
from deployments.downstream import SAME_VERSION_ATTEMPTS, SAME_VERSION_RETRY_S
from deployments.errors import InvalidInput, ModelUnavailable
from deployments.ort import write_file
from deployments.runtime import BatchingConfig, ModelDeployment, model_cache
from deployments.scoring import (
    DEFAULT_CONSE_TOP_T,
    DEFAULT_TEMPERATURE,
    conse_decomposition,
    conse_embedding,
    l2_normalize,
    late_fusion,
    similarity_scores,
)

logger = logging.getLogger("ray.serve")

NAME = "conse-late-fusion"
METHOD = "ConSE (Norouzi et al., 2014) image-to-text projection + weighted late fusion"


class FusionConfig(BatchingConfig):
    """``FusionScorer``'s ``user_config``: how labels are scored and fused, and its batching. All live."""

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


def fuse(batch: list[FusionInput], config: FusionConfig) -> list[FusionResult]:
    """Score and fuse a batch; the ConSE projection of the images that share class embeddings is one product."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(batch):
        if item.vision is not None:
            groups.setdefault(id(item.class_embeddings), []).append(i)
    image_embeddings = {}
    for members in groups.values():
        probs = np.stack([batch[i].vision.probs for i in members])
        projected = conse_embedding(probs, batch[members[0]].class_embeddings, config.top_t)
        image_embeddings.update(zip(members, projected))

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


def explain_fusion(item: FusionInput, class_names: list[str], config: FusionConfig) -> FusionExplanation:
    """The exact decomposition of one item's scores, from the same embeddings ``fuse`` scored it with."""
    classes, contributions, vision_similarity, text_similarity = [], None, None, None
    if item.vision is not None:
        top, weights, contributions = conse_decomposition(
            item.vision.probs, item.class_embeddings, item.label_embeddings, config.top_t
        )
        classes = [(class_names[i], float(item.vision.probs[i]), float(w)) for i, w in zip(top, weights)]
        vision_similarity = contributions.sum(axis=0)
    if item.text_embedding is not None:
        labels = l2_normalize(item.label_embeddings.astype(np.float64))
        text_similarity = labels @ l2_normalize(item.text_embedding.astype(np.float64))
    return FusionExplanation(config.temperature, classes, contributions, vision_similarity, text_similarity)


class KeptMatrices:
    """Class-name matrices kept in the model cache (``$MAAS_MODEL_CACHE/conse``), so a replica that starts
    reads the matrix instead of sending 1,000 class names through the text deployment (about 11 s of a
    2-core node's start).

    A matrix is filed under a digest of the class names, the prompt and the text model's ``identity``
    (its compiled graph and runtime: ``TextEncoder.identity``), so it is only ever read for the exact model
    that would make it again. Kept as ``.npy`` (numbers only, read without pickle), written under a
    temporary name and renamed; one that does not read back as a finite matrix of the right shape is made
    again. A cache that cannot be written costs only the time to make the matrix.
    """

    def __init__(self, root: Path | None = None):
        self.root = root or model_cache("conse")

    def path(self, names: list[str], identity: str, prompt: str) -> Path:
        key = json.dumps({"format": KEPT_FORMAT, "names": names, "text": identity, "prompt": prompt})
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"

    def read(self, names: list[str], identity: str | None, prompt: str) -> np.ndarray | None:
        if identity is None:
            return None
        path = self.path(names, identity, prompt)
        try:
            matrix = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("%s in the model cache is unreadable (%s): making it again", path, type(exc).__name__)
            return None
        if matrix.ndim != 2 or matrix.shape[0] != len(names) or matrix.dtype != np.float32:
            logger.warning("%s in the model cache has shape %s: making it again", path, matrix.shape)
            return None
        if not np.isfinite(matrix).all():
            logger.warning("%s in the model cache holds non-finite values: making it again", path)
            return None
        return matrix

    def keep(self, names: list[str], identity: str | None, prompt: str, matrix: np.ndarray) -> None:
        if identity is None:
            return
        path = self.path(names, identity, prompt)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, buffer.getvalue())
        except OSError as exc:
            logger.warning("Cannot keep the class-name matrix in %s (%s): each start makes it", self.root, exc)


class ClassEmbeddings:
    """The ConSE class-name embeddings, one matrix per (vision classes, text version, class prompt).

    A request is scored with the matrix of exactly the models that answered it:
    during a live update the old and the new version of a model serve side by
    side. The matrix depends on the vision model only through its class names,
    so a new vision version with the same classes (new weights, say) reuses it;
    a new text version needs its own. A missing matrix is made once (concurrent
    requests wait for the same one): the class names embedded by that text version.
    """

    def __init__(self, vision: DeploymentHandle, text: DeploymentHandle, kept: KeptMatrices | None = None):
        self._vision, self._text = vision, text
        self._kept = kept or KeptMatrices()
        self._matrices: OrderedDict[tuple[int, str, str], asyncio.Future] = OrderedDict()
        self._classes: dict[str, tuple[int, list[str]]] = {}  # vision version -> (key of its names, names)
        self._latest: tuple[str, str] | None = None  # the (vision, text) versions last asked for

    async def get(self, vision_version: str, text_version: str, prompt: str) -> np.ndarray:
        self._latest = (vision_version, text_version)
        names_key, names = await self._class_names(vision_version)
        key = (names_key, text_version, prompt)
        future = self._matrices.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._store(key, asyncio.ensure_future(self._make(names, text_version, prompt)))
        self._matrices.move_to_end(key)
        return await asyncio.shield(future)

    async def names(self, vision_version: str) -> list[str]:
        """The class names of a vision version."""
        return (await self._class_names(vision_version))[1]

    async def warm(self, prompt: str) -> None:
        """Make the matrix for the models last used (or served now) and ``prompt``, before a request needs it."""
        if self._latest is not None:
            await self.get(*self._latest, prompt)
            return
        names, vision_version = await self._vision.class_names.remote()
        names_key = self._remember(vision_version, names)
        vectors, text_version = await self._kept_or_embedded(names, prompt, None)
        done = asyncio.get_running_loop().create_future()
        done.set_result(vectors)
        self._store((names_key, text_version, prompt), done)
        self._latest = (vision_version, text_version)

    def _store(self, key: tuple[int, str, str], future: asyncio.Future) -> asyncio.Future:
        self._matrices[key] = future
        while len(self._matrices) > CLASS_EMBEDDING_VERSIONS:
            self._matrices.popitem(last=False)
        return future

    def _remember(self, version: str, names: list[str]) -> int:
        names_key = hash(tuple(names))
        self._classes[version] = (names_key, names)
        while len(self._classes) > CLASS_EMBEDDING_VERSIONS:
            self._classes.pop(next(iter(self._classes)))
        return names_key

    async def _make(self, names: list[str], text_version: str, prompt: str) -> np.ndarray:
        return (await self._kept_or_embedded(names, prompt, text_version))[0]

    async def _kept_or_embedded(self, names: list[str], prompt: str, version: str | None) -> tuple[np.ndarray, str]:
        """The matrix of ``names`` under ``prompt`` by text ``version`` (None: the version of the replica that
        answers first) and that version: the kept one where that replica serves ``version``, else embedded
        through the text deployment and kept."""
        start = time.perf_counter()
        served, identity = await self._text.identity.remote()
        version = version or served
        identity = identity if served == version else None  # a replica of another version answered
        kept = self._kept.read(names, identity, prompt)
        if kept is not None:
            return kept, version
        vectors, _ = await self._embed([prompt.format(name) for name in names], version)
        self._kept.keep(names, identity, prompt, vectors)
        logger.info(
            "ConSE class embeddings of %d classes for text %s made in %.1f s",
            len(names),
            version,
            time.perf_counter() - start,
        )
        return vectors, version

    async def _embed(self, prompts: list[str], version: str | None) -> tuple[np.ndarray, str]:
        """The prompts embedded by text ``version`` (by the version that answers first if None), and that version.

        Sent ``CLASS_EMBEDDING_CHUNK`` at a time, one call after the other: every text of a call joins the text
        replica's batch queue at once, so a call of all 1000 class names would put requests arriving meanwhile
        behind all of them (25 s on two cores under load, while a new fusion replica started).
        """
        parts = []
        for start in range(0, len(prompts), CLASS_EMBEDDING_CHUNK):
            chunk = prompts[start : start + CLASS_EMBEDDING_CHUNK]
            for _ in range(SAME_VERSION_ATTEMPTS):
                embeddings = await self._text.embed.remote(chunk, monitor=False)
                version = version or embeddings.version
                if embeddings.version == version:
                    parts.append(embeddings.vectors)
                    break
                await asyncio.sleep(SAME_VERSION_RETRY_S)
            else:
                raise ModelUnavailable(f"text model version {version} is no longer served; retry", retryable=True)
        return np.concatenate(parts), version

    async def _class_names(self, version: str) -> tuple[int, list[str]]:
        for _ in range(SAME_VERSION_ATTEMPTS):
            if version in self._classes:
                return self._classes[version]
            names, answered = await self._vision.class_names.remote()
            self._remember(answered, names)
            if answered != version:
                await asyncio.sleep(SAME_VERSION_RETRY_S)
        raise ModelUnavailable(f"vision model version {version} is no longer served; retry", retryable=True)


# Of what ``KeptMatrices`` files: raise it when the matrix's making changes.
KEPT_FORMAT = 1
# Matrices kept (each 1000 classes x 384 floats, 1.5 MB): enough for the old
# and the new classes and text model during an update.
CLASS_EMBEDDING_VERSIONS = 4
# Class names embedded per call to the text deployment, one batch at the shipped max_batch_size: a call
# waits its turn behind the live requests queued before it, and they wait behind at most one such call.
CLASS_EMBEDDING_CHUNK = 16


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1}, user_config={})
class FusionScorer(ModelDeployment):
    """Serve deployment: ConSE scoring and late fusion over the other models' outputs.

    Its settings (``FusionConfig``) are live like a model's (``ModelDeployment``);
    a new ``class_prompt`` gets its class-name matrix made before it is served.
    """

    settings_type = FusionConfig
    task = "cross-modal-scoring"
    group_methods = frozenset({"fuse"})

    def __init__(self, vision: DeploymentHandle, text: DeploymentHandle):
        super().__init__()
        self.class_embeddings = ClassEmbeddings(vision, text)

    def batch_methods(self) -> list:
        return [self._fuse_batch]

    async def prepare(self, settings: FusionConfig) -> None:
        if self.settings is None or settings.class_prompt != self.settings.class_prompt:
            await self.class_embeddings.warm(settings.class_prompt)  # at start-up: the first matrix

    def commit(self, prepared: None) -> None:
        self.metrics.set_model(*self.served())

    def served(self) -> tuple[str, str]:
        return NAME, f"conse-top{self.settings.top_t}"

    def describe(self) -> dict:
        return {
            "source": "text embeddings of the vision model's class names",
            "device": "cpu",
            "torch_threads": 0,
            "details": {"method": METHOD, **self.settings.model_dump()},
            "drift": {
                "status": "disabled",
                "message": "fusion keeps no reference profile: drift is watched on its inputs, "
                "by the vision and text deployments",
            },
        }

    async def fuse(
        self,
        vision: VisionResult | None,
        embeddings: TextEmbeddings,
        with_text: bool,
        vision_weight: float | None = None,
        text_weight: float | None = None,
        explain: bool = False,
    ) -> FusionResult:
        """Fuse one request. ``embeddings`` holds the labels' embeddings, then the text's if any. With
        ``explain``, the result says exactly how its scores were made (``FusionExplanation``)."""
        with self.counted():
            settings = self.settings
            weights = {
                "vision": settings.vision_weight if vision_weight is None else vision_weight,
                "text": settings.text_weight if text_weight is None else text_weight,
            }
            present = ["vision"] * (vision is not None) + ["text"] * with_text
            if sum(weights[name] for name in present) <= 0:
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
            if vision is not None:
                item.class_embeddings = await self.class_embeddings.get(
                    vision.version, embeddings.version, settings.class_prompt
                )
            result = await self._fuse_batch(item)
            if explain:
                names = await self.class_embeddings.names(vision.version) if vision is not None else []
                result.explanation = explain_fusion(item, names, settings)
            return result

    @serve.batch(**FusionConfig.batch_defaults())
    async def _fuse_batch(self, items: list[FusionInput]) -> list[FusionResult]:
        start = time.perf_counter()
        results = await asyncio.to_thread(fuse, items, self.settings)
        self.metrics.observe_batch(len(items), 0.0, time.perf_counter() - start)
        for result in results:
            # Labels are free text, so the class index is the winner's position in the request.
            best = int(np.argmax(result.fused))
            self.metrics.observe_prediction(best, float(result.fused[best]))
        return results


def keep_default() -> Path:
    """Make and keep the class-name matrix of the default (shipped) vision and text models and prompt now, as
    the first fusion replica would (``make install`` and the image do it, after compiling both models): the
    text model run in this process, a chunk at a time as the text deployment is sent them."""
    from deployments.text import TextConfig, load_text
    from deployments.vision import VisionConfig, load_vision

    names = list(load_vision(VisionConfig()).categories)
    text = load_text(TextConfig())
    prompt = FusionConfig().class_prompt
    kept = KeptMatrices()
    identity = getattr(text, "identity", None)
    if identity is None:
        raise RuntimeError("the default text model is not compiled for ONNX Runtime: run python -m deployments.text")
    if kept.read(names, identity, prompt) is None:
        prompts = [prompt.format(name) for name in names]
        step = CLASS_EMBEDDING_CHUNK
        kept.keep(
            names,
            identity,
            prompt,
            np.concatenate([text.embed(prompts[i : i + step]) for i in range(0, len(prompts), step)]),
        )
    return kept.path(names, identity, prompt)


if __name__ == "__main__":  # `python -m deployments.fusion`: keep the default class-name matrix now (make install does)
    logging.basicConfig(level=logging.INFO)
    print(keep_default())
