"""The request graph, independent of any protocol: what every route, and the batch job, asks of the models.

A protocol router parses its request, calls one of these methods and renders the domain result it gets
back (the dataclasses of ``deployments.contracts``). Here, once for all of them:

* images are decoded and prepared for the vision model in a bounded pool of threads, with the model's
  geometry fetched once per model version (``prepare_image``);
* every model call is made within the request's deadline and retried where a replica stopped under it
  (``downstream.call_models``);
* the multimodal graph: the image and text branches start together, and fusion receives their responses
  without the caller waiting in between (Serve resolves them as arguments).
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from deployments.contracts import (
    FusionResult,
    GenerationChunk,
    GenerationRequest,
    TextEmbeddings,
    TextRanking,
    VisionResult,
)
from deployments.downstream import Deadline, api_error, call_models
from deployments.errors import ModelTimeout
from deployments.imaging import ImageSpec, decode_base64, decode_image, prepare
from deployments.settings import limits
from monitoring.metrics import RequestMetrics
from pipelines.registry import ModelRegistry


@dataclass
class PreparedImage:
    pixels: np.ndarray  # (crop, crop, 3) uint8, ready for the vision model
    size_bytes: int  # encoded upload
    source_pixels: int  # width x height of the upload
    seconds: float  # to decode and prepare


@dataclass
class Analysis:
    """A multimodal answer: the fused label scores, and the vision branch's classes when an image was sent."""

    fusion: FusionResult
    image: VisionResult | None


def decode_and_prepare(raw: bytes | None, image_b64: str | None, spec: ImageSpec) -> PreparedImage:
    """Bytes (or base64) to the vision model's input, within the limits. CPU-bound: runs in a decode thread."""
    start = time.perf_counter()
    raw = raw if raw is not None else decode_base64(image_b64 or "", limits())
    image = decode_image(raw, limits())
    pixels = prepare(image, spec)
    return PreparedImage(pixels, len(raw), image.width * image.height, time.perf_counter() - start)


class Dataplane:
    """Calls the ``vision``, ``text`` and ``fusion`` models of ``models``.

    ``metrics`` (the ingress's instruments) records each decoded image under the route that sent it; the
    batch job passes none.
    """

    def __init__(self, models: ModelRegistry, max_concurrent_decodes: int = 2, metrics: RequestMetrics | None = None):
        self.models = models
        self.metrics = metrics
        self._decoder = ThreadPoolExecutor(max_concurrent_decodes, thread_name_prefix="decode")
        self._decodes = max_concurrent_decodes
        self._image_spec: ImageSpec | None = None
        self._image_spec_version: str | None = None  # the vision model version the geometry belongs to

    def configure(self, max_concurrent_decodes: int) -> None:
        """Images decoded at once (bounds the caller's memory); decodes in progress finish in the old pool."""
        if max_concurrent_decodes != self._decodes:
            previous = self._decoder
            self._decoder = ThreadPoolExecutor(max_concurrent_decodes, thread_name_prefix="decode")
            self._decodes = max_concurrent_decodes
            previous.shutdown(wait=False)

    # --- images ---------------------------------------------------------------------

    async def prepare_image(
        self, route: str, deadline: Deadline, raw: bytes | None = None, image_b64: str | None = None
    ) -> np.ndarray:
        """Decode, validate and prepare one image (bytes, or base64) for the vision model: geometry only."""
        if self._image_spec is None:
            vision = self.models["vision"]
            self._image_spec, self._image_spec_version = await call_models(vision.geometry.remote, deadline)
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self._decoder, decode_and_prepare, raw, image_b64, self._image_spec)
        if self.metrics is not None:
            self.metrics.observe_image(route, image.size_bytes, image.source_pixels, image.seconds)
        return image.pixels

    def _seen_vision_version(self, version: str) -> None:
        """A live model update can change the geometry: ask again once another version answers."""
        if version != self._image_spec_version:
            self._image_spec = None

    # --- models ---------------------------------------------------------------------

    async def classify(self, pixels: np.ndarray, top_k: int, embed: bool, deadline: Deadline) -> VisionResult:
        vision = self.models["vision"]
        result = await call_models(lambda: vision.classify.remote(pixels, top_k, embed), deadline)
        self._seen_vision_version(result.version)
        return result

    async def classify_many(
        self, images: list[np.ndarray], top_k: int, embed: bool, deadline: Deadline
    ) -> list[VisionResult]:
        """Each image is its own call, so they join the replicas' batches as separate requests would."""
        vision = self.models["vision"]

        async def calls() -> list[VisionResult]:
            return list(await asyncio.gather(*(vision.classify.remote(p, top_k, embed) for p in images)))

        results = await call_models(calls, deadline)
        for result in results:
            self._seen_vision_version(result.version)
        return results

    async def embed(self, texts: list[str], deadline: Deadline) -> TextEmbeddings:
        text = self.models["text"]
        return await call_models(lambda: text.embed.remote(texts), deadline)

    async def zero_shot(self, text: str, labels: list[str], deadline: Deadline) -> TextRanking:
        model = self.models["text"]
        return await call_models(lambda: model.classify.remote(text, labels), deadline)

    async def analyze(
        self,
        pixels: np.ndarray | None,
        text: str | None,
        labels: list[str],
        deadline: Deadline,
        top_k: int = 5,
        vision_weight: float | None = None,
        text_weight: float | None = None,
    ) -> Analysis:
        """Score ``labels`` against an image, a text or both, and fuse the scores (ConSE + late fusion)."""
        vision, text_model, fusion = self.models["vision"], self.models["text"], self.models["fusion"]
        with_text = text is not None

        async def graph() -> Analysis:
            # Both branches start now and run in parallel; fusion takes their
            # responses as arguments, so it starts as soon as both are done.
            image = vision.classify.remote(pixels, top_k) if pixels is not None else None
            embeddings = text_model.embed_labels.remote(labels, text)
            fused = fusion.fuse.remote(image, embeddings, with_text, vision_weight, text_weight)
            return Analysis(fusion=await fused, image=await image if image is not None else None)

        analysis = await call_models(graph, deadline)
        if analysis.image is not None:
            self._seen_vision_version(analysis.image.version)
        return analysis

    async def generate(self, request: GenerationRequest, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        """The language model's answer as it is generated (``llm``'s streaming ``generate``).

        Waits for the first chunk (the request accepted, or refused with an API error) within the deadline, as
        any model call; the iterator then yields the rest as they come. Closing it early (the client went
        away) cancels the generation in its replica.
        """
        llm = self.models["llm"]
        stream = None

        async def accepted() -> GenerationChunk:
            nonlocal stream
            stream = llm.options(stream=True).generate.remote(request)
            return await stream.__anext__()

        head = await call_models(accepted, deadline)
        return _relay(head, stream, deadline)


async def _relay(head: GenerationChunk, stream, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
    finished = False
    try:
        yield head
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=deadline.remaining())
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ModelTimeout("the answer did not finish within the request's deadline") from None
            except Exception as exc:  # noqa: BLE001 - API errors keep their status; the rest are bugs
                error = api_error(exc)
                raise error or exc from None
            yield chunk
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                stream.cancel()
