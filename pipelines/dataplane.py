"""The request graph, independent of any protocol: what every route, and the batch job, asks of the models.

A protocol router parses its request, calls one of these methods and renders the domain result it gets
back (the dataclasses of ``deployments.contracts``). Here, once for all of them:

* images are decoded and prepared for the vision model in a bounded pool of threads, with the model's
  geometry fetched once per model version (``prepare_image``);
* every model call is made within the request's deadline and retried where a replica stopped under it
  (``downstream.call_models``);
* the multimodal graph: the image and text branches start together, and fusion receives their responses
  without the caller waiting in between (Serve resolves them as arguments);
* image to words to answers: vision and OCR look at an image in parallel (``look``), their evidence goes into
  the language model's prompt (``pipelines.grounding``), and the model answers: a description
  (``describe``) or a chat turn about the images in it (``chat``). The describe route, OpenAI
  chat and the batch job's ``--describe`` all go through these.
"""

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from deployments.audio import DecodedAudio
from deployments.contracts import (
    FusionResult,
    GenerationChunk,
    GenerationRequest,
    ImageExplanation,
    OcrLine,
    OcrResult,
    SpeechRequest,
    TextEmbeddings,
    TextExplanation,
    TextRanking,
    TextScores,
    Transcript,
    TranscriptionRequest,
    VisionResult,
)
from deployments.downstream import Deadline, call_models
from deployments.errors import InvalidInput, PolicyBlocked
from deployments.imaging import ImageSpec, crop_region, decode_base64, decode_image, fit_within, prepare
from deployments.settings import limits
from deployments.words import check_words
from knowledge.graph import Fact, KnowledgeGraph, Synset, UnknownConcept, knowledge_graph
from knowledge.rules import CompiledPolicy, Decision, Facts
from monitoring.metrics import RequestMetrics
from pipelines import grounding, usage
from pipelines.grounding import Evidence
from pipelines.grouping import Grouped
from pipelines.registry import ModelRegistry
from pipelines.rollouts import Rollouts, Routed
from pipelines.speech import SpeechGraph, relay
from pipelines.usage import private

DESCRIBE_CLASSES = 5  # classes asked of the vision model for evidence (grounding keeps the likely ones)


@dataclass
class PreparedImage:
    pixels: np.ndarray | None  # (crop, crop, 3) uint8, ready for the vision model (if asked for)
    size_bytes: int  # encoded upload
    source_pixels: int  # width x height of the upload
    seconds: float  # to decode and prepare
    page: np.ndarray | None = None  # (H, W, 3) uint8 for OCR, long side at most OCR_MAX_SIDE_PX (if asked for)
    page_scale: float = 1.0  # page pixels to upload pixels
    size: tuple[int, int] = (0, 0)  # width, height of the upload


@dataclass
class Looked:
    """What vision and OCR found in one image, and the evidence the language model is given from it."""

    vision: VisionResult
    ocr: OcrResult
    evidence: Evidence
    seconds: dict[str, float]  # each model's answer, waited for in parallel: {"vision": s, "ocr": s}


@dataclass
class Description:
    """A grounded description of an image, with what it was built from."""

    text: str
    looked: Looked
    last: GenerationChunk  # the answer's last chunk: finish reason, token counts, model and version
    seconds: dict[str, float]  # time spent waiting for vision, ocr (in parallel) and the language model
    decision: Decision | None = None  # the policy's, when one was asked for
    masked: int = 0  # matches of the policy's masks replaced, in the text read and in the description


@dataclass
class Chat:
    """A chat turn being answered, with what it was grounded in."""

    chunks: AsyncIterator[GenerationChunk]
    looked: list[Looked]  # each image's findings
    facts: list[Fact]  # the knowledge given: about the images' classes, then the concepts the user named
    masked: int = 0  # matches of the policy's masks replaced in the images' text before the model read it


DEFAULT_QUESTION = "What is in this picture?"
"""What ``ask`` asks about an image that came without a question."""


@dataclass
class Heard:
    """A transcript and the audio it came from."""

    transcript: Transcript
    audio: DecodedAudio


@dataclass
class Answer:
    """A question asked in speech, text and/or with an image, answered: what was heard and seen, the answer, and
    the answer spoken."""

    question: str
    text: str
    last: GenerationChunk  # the answer's last chunk: finish reason, token counts, model and version
    heard: Heard | None
    looked: object | None  # pipelines.dataplane.Looked
    speech: bytes | None
    speech_seconds: float
    speech_model: str | None
    seconds: dict[str, float]  # each stage: asr, vision and ocr (in parallel with it), llm, tts
    facts: list
    decision: Decision | None = None
    masked: int = 0


@dataclass
class Analysis:
    """A multimodal answer: the fused label scores, and the vision branch's classes when an image was sent."""

    fusion: FusionResult
    image: VisionResult | None


def decode_and_prepare(
    raw: bytes | None, image_b64: str | None, spec: ImageSpec | None, ocr: bool = False
) -> PreparedImage:
    """Bytes (or base64) to the vision model's input (given its ``spec``) and, with ``ocr``, the OCR model's,
    within the limits: one decode for both. CPU-bound: runs in a decode thread."""
    start = time.perf_counter()
    raw = raw if raw is not None else decode_base64(image_b64 or "", limits())
    image = decode_image(raw, limits())
    pixels = prepare(image, spec) if spec is not None else None
    page, scale = fit_within(image) if ocr else (None, 1.0)
    return PreparedImage(
        pixels, len(raw), image.width * image.height, time.perf_counter() - start, page, scale, image.size
    )


class Dataplane(SpeechGraph):
    """Calls the models of ``models``: ``vision``, ``text`` and ``fusion``, ``ocr``, ``llm``, the ``explainer``,
    and the speech models ``asr`` and ``tts`` (``SpeechGraph``).

    ``metrics`` (the ingress's instruments) records each decoded image under the route that sent it; the
    batch job passes none. ``knowledge`` (the shipped WordNet graph by default) turns class probabilities into
    concepts and facts.
    """

    def __init__(
        self,
        models: ModelRegistry,
        max_concurrent_decodes: int = 2,
        metrics: RequestMetrics | None = None,
        knowledge: KnowledgeGraph | None = None,
        rollouts: Rollouts | None = None,
    ):
        self.models = models
        self.rollouts = rollouts or Rollouts()
        self.metrics = metrics
        self.knowledge = knowledge or knowledge_graph()
        self.policies: dict[str, CompiledPolicy] = {}  # the ingress's user_config sets them, live
        self.policy_update_error: str | None = None  # why the last change of them was refused
        self._decoder = ThreadPoolExecutor(max_concurrent_decodes, thread_name_prefix="decode")
        self._decodes = max_concurrent_decodes
        self._image_spec: ImageSpec | None = None
        self._image_spec_version: str | None = None  # the vision model version the geometry belongs to
        # Concurrent requests' calls of one model method go out together (pipelines/grouping.py).
        # The calls of a model that can have a candidate go to the variant a rollout picks for the request
        # (pipelines/rollouts.py); the language model's and the recogniser's streams too (generate, transcribe).
        self.vision_calls = Routed("vision", self.rollouts, lambda v: self._group_sender("vision", "classify", v))
        self.text_calls = Routed("text", self.rollouts, lambda v: self._method_sender("text", v), grouped=False)
        self.ocr_calls = Routed("ocr", self.rollouts, lambda v: self._method_sender("ocr", v), grouped=False)
        self.label_calls: Grouped[tuple, TextEmbeddings] = Grouped(self._group_sender("text", "embed_labels"))
        self.fusion_calls: Grouped[tuple, FusionResult] = Grouped(self._group_sender("fusion", "fuse"))

    def configure(self, max_concurrent_decodes: int, max_group_size: int, max_groups_in_flight: int) -> None:
        """Images decoded at once (bounds the caller's memory; decodes in progress finish in the old pool), and
        how model calls are grouped."""
        for grouped in (self.vision_calls, self.label_calls, self.fusion_calls):
            grouped.configure(max_group_size, max_groups_in_flight)
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
        return (await self.prepare_views(route, deadline, raw, image_b64)).pixels

    async def prepare_views(
        self,
        route: str,
        deadline: Deadline,
        raw: bytes | None = None,
        image_b64: str | None = None,
        vision: bool = True,
        ocr: bool = False,
    ) -> PreparedImage:
        """Decode and validate one image once, and prepare it for the vision model, the OCR model or both."""
        spec = None
        if vision:
            if self._image_spec is None:
                model = self.models["vision"]
                self._image_spec, self._image_spec_version = await call_models(model.geometry.remote, deadline)
            spec = self._image_spec
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self._decoder, decode_and_prepare, raw, image_b64, spec, ocr)
        if self.metrics is not None:
            self.metrics.observe_image(route, image.size_bytes, image.source_pixels, image.seconds)
        return image

    def _seen_vision_version(self, result: VisionResult) -> None:
        """A live model update can change the geometry: ask again once another version of the stable variant
        answers (a rollout's candidate prepares images again itself where its geometry differs)."""
        if result.variant == "stable" and result.version != self._image_spec_version:
            self._image_spec = None

    # --- knowledge ------------------------------------------------------------------

    def concepts(self, names: list[str], field: str = "concepts") -> list[Synset]:
        """The synsets ``names`` stand for, before any model work; an unknown one is refused (422, at its index
        in ``field``) with close matches."""
        resolved = []
        for index, name in enumerate(names):
            try:
                resolved.append(self.knowledge.resolve(name))
            except UnknownConcept as exc:
                raise InvalidInput(str(exc), field=(field, index)) from None
        return resolved

    def rollups(self, result: VisionResult, synsets: list[Synset], field: str = "concepts") -> list[float]:
        """The probability that the image is each synset: its ImageNet classes' probabilities summed."""
        classes = len(self.knowledge.classes)
        if len(result.probs) != classes:
            raise InvalidInput(
                f"concepts need a vision model over the {classes} ImageNet classes; the served model "
                f"{result.model} has {len(result.probs)}",
                field=field,
            )
        return [self.knowledge.rollup(result.probs, synset.id) for synset in synsets]

    def policy(self, name: str | None) -> CompiledPolicy | None:
        """The policy a request names (None: no policy); an unknown name is refused before any work."""
        if name is None:
            return None
        policy = self.policies.get(name)
        if policy is None:
            known = ", ".join(sorted(self.policies)) or "none are configured"
            raise InvalidInput(f"unknown policy; the policies are: {known}", field="policy")
        return policy

    def judge(
        self,
        policy: CompiledPolicy,
        route: str,
        images: list[VisionResult] = (),
        ocr: list[OcrResult] = (),
        labels: dict[str, float] | None = None,
        output: str = "",
        input: str = "",
    ) -> Decision:
        """The policy's decision on what the models said; a ``block`` raises ``PolicyBlocked`` (403)."""
        facts = Facts(
            route=route,
            classes=[entry for result in images for entry in self._classes(result)],
            concepts={
                name: max((self.knowledge.rollup(r.probs, key) for r in images if self._imagenet(r)), default=0.0)
                for name, key in policy.concepts.items()
            },
            labels=labels or {},
            text="\n".join(line.text for result in ocr for line in result.lines),
            output=output,
            input=input,
        )
        decision = policy.evaluate(facts)
        if decision.blocked_by is not None:
            raise PolicyBlocked(policy.name, decision.blocked_by)
        return decision

    def _imagenet(self, result: VisionResult) -> bool:
        return len(result.probs) == len(self.knowledge.classes)

    def _classes(self, result: VisionResult) -> list[dict]:
        """A vision result's top classes as facts, each with its synset (the order ``result.labels`` has)."""
        if not self._imagenet(result):
            return [{"label": label, "probability": p, "synset": ""} for label, p in result.labels]
        order = np.argsort(-result.probs)[: len(result.labels)]
        return [
            {"label": label, "probability": p, "synset": self.knowledge.classes[index]}
            for (label, p), index in zip(result.labels, order)
        ]

    # --- models ---------------------------------------------------------------------

    def _group_sender(self, model: str, method: str, variant: str = "stable"):
        async def send(calls: list[tuple]) -> list:
            return await self._variant(model, variant).call_group.remote(method, calls)

        return send

    def _variant(self, model: str, variant: str):
        """The handle of a model's variant: the stable deployment, or its rollout's candidate."""
        return self.rollouts.candidates[model] if variant == "candidate" else self.models[model]

    def _method_sender(self, model: str, variant: str):
        async def send(call: tuple[str, tuple]):
            method, args = call
            return await getattr(self._variant(model, variant), method).remote(*args)

        return send

    async def classify(self, pixels: np.ndarray, top_k: int, embed: bool, deadline: Deadline) -> VisionResult:
        result = await call_models(lambda: self.vision_calls((pixels, top_k, embed)), deadline)
        self._seen_vision_version(result)
        return result

    async def classify_many(
        self, images: list[np.ndarray], top_k: int, embed: bool, deadline: Deadline
    ) -> list[VisionResult]:
        """Each image is its own item, so they join the replicas' batches as separate requests would."""

        async def calls() -> list[VisionResult]:
            return list(await asyncio.gather(*(self.vision_calls((p, top_k, embed)) for p in images)))

        results = await call_models(calls, deadline)
        for result in results:
            self._seen_vision_version(result)
        return results

    async def embed(self, texts: list[str], deadline: Deadline) -> TextEmbeddings:
        texts = await private(texts)
        return await call_models(lambda: self.text_calls(("embed", (texts,))), deadline)

    async def score(self, queries: list[str], documents: list[str], deadline: Deadline) -> TextScores:
        """How relevant each document is to its query (one query for every document, or one each), as the
        ``text`` model scores pairs (``TextEncoder.score``); the texts are masked first, as ``embed``'s are."""
        texts = await private([*queries, *documents])
        queries, documents = texts[: len(queries)], texts[len(queries) :]
        return await call_models(lambda: self.text_calls(("score", (queries, documents))), deadline)

    async def zero_shot(self, text: str, labels: list[str], deadline: Deadline) -> TextRanking:
        (text,) = await private([text])
        return await call_models(lambda: self.text_calls(("classify", (text, labels))), deadline)

    async def analyze(
        self,
        pixels: np.ndarray | None,
        text: str | None,
        labels: list[str],
        deadline: Deadline,
        top_k: int = 5,
        vision_weight: float | None = None,
        text_weight: float | None = None,
        explain: bool = False,
    ) -> Analysis:
        """Score ``labels`` against an image, a text or both, and fuse the scores (ConSE + late fusion); with
        ``explain``, fusion says exactly how (``FusionResult.explanation``)."""
        with_text = text is not None
        if with_text:
            (text,) = await private([text])

        async def graph() -> Analysis:
            # Both branches start now and run in parallel; fusion starts as soon as both are done. The vision
            # branch stays on the stable variant: fusion embeds the class names of the vision deployment it is
            # bound to, by version, and knows no candidate's.
            if pixels is None:
                embeddings, image = await self.label_calls((labels, text)), None
            else:
                embeddings, image = await asyncio.gather(
                    self.label_calls((labels, text)), self.vision_calls.stable((pixels, top_k, False))
                )
            fused = await self.fusion_calls((image, embeddings, with_text, vision_weight, text_weight, explain))
            return Analysis(fusion=fused, image=image)

        analysis = await call_models(graph, deadline)
        if analysis.image is not None:
            self._seen_vision_version(analysis.image)
        return analysis

    # --- explanations -----------------------------------------------------------------

    async def explain_image(
        self, pixels: np.ndarray, label: str | None, method: str, steps: int, grid: int, heatmap: bool,
        deadline: Deadline,
    ) -> ImageExplanation:  # fmt: skip
        """A saliency map of a prepared image for a class (None: the top one), by the explainer deployment."""
        explainer = self.models["explainer"]
        return await call_models(
            lambda: explainer.explain_image.remote(pixels, label, method, steps, grid, heatmap), deadline
        )

    def crop_region(self, image: PreparedImage) -> tuple[float, float, float, float]:
        """Where the crop the vision model classified lies in the upload (x, y, width, height)."""
        spec = self._image_spec
        return crop_region(image.size, spec.resize_size, spec.crop_size)

    async def explain_text(
        self, text: str, labels: list[str], label: str | None, deadline: Deadline
    ) -> TextExplanation:
        """Each word's contribution to a zero-shot label of ``text``; a text of too many words is refused first."""
        check_words(text)
        if label is not None and label not in labels:
            raise InvalidInput("label must be one of labels", field="label")
        (text,) = await private([text])
        explainer = self.models["explainer"]
        return await call_models(lambda: explainer.explain_text.remote(text, labels, label), deadline)

    async def read_text(self, image: PreparedImage, deadline: Deadline) -> OcrResult:
        """The lines of text in an image (prepared with ``ocr``), with boxes in the upload's pixels."""
        result = await call_models(lambda: self.ocr_calls(("read", (image.page,))), deadline)
        return _in_upload_pixels(result, image.page_scale)

    async def look(self, image: PreparedImage, deadline: Deadline, knowledge: bool = False) -> Looked:
        """Vision and OCR on one image (prepared for both), in parallel, and the evidence they give (with
        ``knowledge``, the knowledge graph's facts about the classes in it too)."""

        async def timed(response) -> tuple[object, float]:
            start = time.perf_counter()
            return await response, time.perf_counter() - start

        async def both() -> tuple[tuple[VisionResult, float], tuple[OcrResult, float]]:
            # Both start now and run in parallel.
            classes = timed(self.vision_calls((image.pixels, DESCRIBE_CLASSES, False)))
            lines = timed(self.ocr_calls(("read", (image.page,))))
            return tuple(await asyncio.gather(classes, lines))

        (classes, vision_s), (lines, ocr_s) = await call_models(both, deadline)
        self._seen_vision_version(classes)
        lines = _in_upload_pixels(lines, image.page_scale)
        facts = self.class_facts(classes) if knowledge else []
        evidence = grounding.gather(classes.labels, lines.lines, facts)
        return Looked(classes, lines, evidence, {"vision": vision_s, "ocr": ocr_s})

    def class_facts(self, result: VisionResult) -> list[Fact]:
        """The knowledge graph's facts about the classes a prompt gets from a vision result."""
        kept = {name for name, _ in grounding.kept_classes(result.labels)}
        return [self.knowledge.fact(c["synset"]) for c in self._classes(result) if c["label"] in kept and c["synset"]]

    def named_facts(self, messages: list[dict]) -> list[Fact]:
        """The knowledge graph's facts about the concepts the chat's last user message names."""
        text = self.last_user_text(messages)
        return [self.knowledge.fact(synset.id) for synset in self.knowledge.mentioned(text, grounding.MAX_FACTS)]

    async def describe(
        self,
        image: PreparedImage,
        max_tokens: int,
        deadline: Deadline,
        policy: CompiledPolicy | None = None,
        route: str = "",
        knowledge: bool = False,
    ) -> Description:
        """One or two sentences about an image, from the language model given only what vision and OCR found.

        With a ``policy``: its rules first run on what vision and OCR found, so a ``block`` refuses the request
        before the language model works, and text its ``mask`` rules match is masked before the model reads it
        (masking only the answer would not do: the model can repeat part of it); then on the answer too.
        """
        looked = await self.look(image, deadline, knowledge)
        masked = 0
        if policy is not None:
            before = self.judge(policy, route, [looked.vision], [looked.ocr])
            looked, masked = _masked(looked, before)
        seen = time.perf_counter()
        request = GenerationRequest(
            messages=grounding.describe_messages(looked.evidence), max_tokens=max_tokens, temperature=0.0, stop=["\n"]
        )
        text, last = await collect(await self.generate(request, deadline))
        seconds = {**looked.seconds, "llm": time.perf_counter() - seen}
        text, decision = text.strip(), None
        if policy is not None:
            decision = self.judge(policy, route, [looked.vision], [looked.ocr], output=text)
            text, count = decision.mask(text)
            masked += count
        return Description(text, looked, last, seconds, decision, masked)

    async def chat(
        self,
        request: GenerationRequest,
        images: list[PreparedImage],
        deadline: Deadline,
        knowledge: bool = False,
        policy: CompiledPolicy | None = None,
        route: str = "",
    ) -> "Chat":
        """A chat turn. Messages may hold images (``grounding.ImagePart`` in their content): every image is
        looked at in parallel and replaced by its evidence. With ``knowledge``, the knowledge graph's facts
        about the images' classes and the concepts the last user message names are given too. With a
        ``policy``, its rules run on what vision and OCR found before the language model starts (a block
        refuses, masked text is masked in the prompt); the answer is the caller's to judge (``judge``)."""
        looked = list(await asyncio.gather(*(self.look(image, deadline, knowledge) for image in images)))
        facts = self.named_facts(request.messages) if knowledge else []
        masked = 0
        if policy is not None:
            before = self.judge(policy, route, [item.vision for item in looked], [item.ocr for item in looked],
                                input=self.last_user_text(request.messages))  # fmt: skip
            for index, item in enumerate(looked):
                looked[index], count = _masked(item, before)
                masked += count
        messages = grounding.chat_messages(request.messages, [item.evidence for item in looked], facts)
        chunks = await self.generate(dataclasses.replace(request, messages=messages), deadline)
        sources = [fact for item in looked for fact in item.evidence.facts] + facts
        return Chat(chunks, looked, sources, masked)

    async def ask(
        self,
        question: str | None,
        audio: DecodedAudio | None,
        image,
        deadline: Deadline,
        *,
        language: str | None = None,
        max_tokens: int | None = None,
        knowledge: bool = False,
        policy: CompiledPolicy | None = None,
        route: str = "",
        speak: SpeechRequest | None = None,
    ) -> Answer:
        """A question in speech (``audio``) and/or text, maybe about an image, answered by the language model and,
        with ``speak``, spoken back. The audio is heard while vision and OCR look at the image. With a
        ``policy``, its rules run on what was heard, read and seen before the language model starts (a block
        refuses, masks mask the question), and on the answer."""
        seconds: dict[str, float] = {}

        async def hear() -> Heard | None:
            if audio is None:
                return None
            start = time.perf_counter()
            transcript = await self.transcribe(audio, TranscriptionRequest(audio.samples, language=language), deadline)
            seconds["asr"] = time.perf_counter() - start
            return Heard(transcript, audio)

        async def see():
            if image is None:
                return None
            looked = await self.look(image, deadline, knowledge)
            seconds.update(looked.seconds)
            return looked

        heard, looked = await asyncio.gather(hear(), see())
        asked = " ".join(part for part in (heard.transcript.text.strip() if heard else "", question or "") if part)
        if not asked:
            if image is None:
                raise InvalidInput("the audio holds no words, and no text was sent with it", field="audio")
            asked = DEFAULT_QUESTION
        messages = [{"role": "user", "content": [grounding.ImagePart(0), asked] if looked else asked}]
        facts = self.named_facts(messages) if knowledge else []
        masked = 0
        if policy is not None:
            before = self.judge(policy, route, [looked.vision] if looked else [], [looked.ocr] if looked else [],
                                input=asked)  # fmt: skip
            asked, count = before.mask(asked)
            masked += count
            if looked is not None:
                looked, count = _masked(looked, before)
                masked += count
            messages = [{"role": "user", "content": [grounding.ImagePart(0), asked] if looked else asked}]
        prompt = grounding.chat_messages(messages, [looked.evidence] if looked else [], facts)
        start = time.perf_counter()
        generation = GenerationRequest(messages=prompt, max_tokens=max_tokens, temperature=0.0)
        text, last = await collect(await self.generate(generation, deadline))
        seconds["llm"] = time.perf_counter() - start
        text, decision = text.strip(), None
        if policy is not None:
            decision = self.judge(policy, route, [looked.vision] if looked else [], [looked.ocr] if looked else [],
                                  output=text, input=asked)  # fmt: skip
            text, count = decision.mask(text)
            masked += count
        speech, said, speaker = None, 0.0, None
        if speak is not None and text:
            start = time.perf_counter()
            chunks = [chunk async for chunk in await self.speak(dataclasses.replace(speak, text=text), deadline)]
            speech = b"".join(chunk.audio for chunk in chunks)
            said = sum(chunk.seconds for chunk in chunks)
            speaker = f"{chunks[0].model} {chunks[0].version}"
            seconds["tts"] = time.perf_counter() - start
        sources = [*(looked.evidence.facts if looked else []), *facts]
        return Answer(asked, text, last, heard, looked, speech, said, speaker, seconds, sources, decision, masked)

    @staticmethod
    def last_user_text(messages: list[dict]) -> str:
        return next((_text_of(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")

    def observe_generation(self, route: str, response_format: str, tool_choice: str) -> None:
        """Count a generation by what it asked for (``RequestMetrics.observe_generation``)."""
        if self.metrics is not None:
            self.metrics.observe_generation(route, response_format, tool_choice)

    async def generate(self, request: GenerationRequest, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        """The language model's answer as it is generated (``llm``'s streaming ``generate``).

        Waits for the first chunk (the request accepted, or refused with an API error) within the deadline, as
        any model call; the iterator then yields the rest as they come. Closing it early (the client went
        away) cancels the generation in its replica.
        """
        masker = usage.masker()
        if masker is not None:
            request = await _private_request(request)

        async def opened(variant: str) -> tuple[GenerationChunk, object]:
            stream = self._variant("llm", variant).options(stream=True).generate.remote(request)
            return await stream.__anext__(), stream

        if "llm" not in self.rollouts.configs:
            head, stream = await call_models(lambda: opened("stable"), deadline)
            chunks = _relay(head, stream, deadline)
        else:  # the variant the rollout picks answers; a greedy answer can be compared with the candidate's
            start = self.rollouts.clock()
            call = await call_models(lambda: self.rollouts.routed("llm", opened), deadline)
            greedy = request.temperature == 0  # a sampled answer is not compared: another sample differs anyway

            def copy() -> Awaitable[str]:
                return _generated_text(self._variant("llm", "candidate"), request)

            relayed = _relay(*call.result, deadline)
            chunks = self.rollouts.followed("llm", call, start, relayed, copy if greedy else None)
        return chunks if masker is None else _masked_answer(chunks)


async def _generated_text(llm, request: GenerationRequest) -> str:
    """The whole text a language model generates for the request (a shadow copy's answer)."""
    return "".join([chunk.text async for chunk in llm.options(stream=True).generate.remote(request)])


async def _private_request(request: GenerationRequest) -> GenerationRequest:
    """The request with personal data masked wherever its text reaches the prompt: the prompt or the messages
    (tool results included), earlier tool calls' arguments, and the tools' descriptions."""
    if request.logprobs is not None:  # a token's text would show what the masked answer hides
        raise InvalidInput("logprobs are not given while personal data is masked", field="logprobs")
    if request.prompt is not None:
        (prompt,) = await private([request.prompt])
        return dataclasses.replace(request, prompt=prompt)
    contents = await private([message.get("content") or "" for message in request.messages])
    messages = []
    for message, content in zip(request.messages, contents, strict=True):
        message = {**message, "content": content if message.get("content") is not None else None}
        if message.get("tool_calls"):
            arguments = await private([call["function"]["arguments"] for call in message["tool_calls"]])
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": text}}
                for call, text in zip(message["tool_calls"], arguments, strict=True)
            ]
        messages.append(message)
    tools = request.tools
    if tools:
        described = await private([tool.get("description") or "" for tool in tools])
        tools = [{**tool, "description": text} if tool.get("description") else tool
                 for tool, text in zip(tools, described, strict=True)]  # fmt: skip
    return dataclasses.replace(request, messages=messages, tools=tools)


SENTENCE_END = re.compile(r"[.!?\n]\s")


async def _masked_answer(chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    """The answer with personal data masked, a sentence at a time: a name or an address can span chunks, so
    text is held back until a sentence ends (or the answer does) and masked whole."""
    held = ""
    try:
        async for chunk in chunks:
            held += chunk.text
            ends = [m.end() for m in SENTENCE_END.finditer(held)]
            cut = len(held) if chunk.finish_reason is not None else (ends[-1] if ends else 0)
            if cut:
                (text,) = await private([held[:cut]])
                held = held[cut:]
                yield dataclasses.replace(chunk, text=text)
            elif not chunk.text or chunk.finish_reason is not None:
                yield chunk  # the first chunk (accepted) and an empty last one
    finally:
        await chunks.aclose()


async def collect(chunks: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    """A whole answer from its chunks: the text, and the last chunk (finish reason, token counts, model), with
    every chunk's log probabilities where they were asked for."""
    parts, logprobs, last = [], None, None
    try:
        async for chunk in chunks:
            parts.append(chunk.text)
            if chunk.logprobs is not None:
                logprobs = (logprobs or []) + chunk.logprobs
            last = chunk
    finally:
        await chunks.aclose()
    if last is not None and logprobs is not None:
        last = dataclasses.replace(last, logprobs=logprobs)
    return "".join(parts), last


def _text_of(content: str | list) -> str:
    """A message's text: its string, or its text parts joined."""
    return content if isinstance(content, str) else " ".join(part for part in content if isinstance(part, str))


def _masked(looked: Looked, decision: Decision) -> tuple[Looked, int]:
    """What vision and OCR found, with the text the decision's masks match masked; how many matches."""
    if not decision.masks:
        return looked, 0
    lines, total = [], 0
    for line in looked.ocr.lines:
        text, count = decision.mask(line.text)
        lines.append(OcrLine(text, line.confidence, line.box))
        total += count
    ocr = dataclasses.replace(looked.ocr, lines=lines)
    evidence = grounding.gather(looked.vision.labels, lines, looked.evidence.facts)
    return dataclasses.replace(looked, ocr=ocr, evidence=evidence), total


def _in_upload_pixels(result: OcrResult, scale: float) -> OcrResult:
    """OCR boxes, read on pixels reduced by ``scale``, in the uploaded image's pixels."""
    if scale != 1.0:
        result.lines = [
            OcrLine(line.text, line.confidence, [(round(x * scale, 1), round(y * scale, 1)) for x, y in line.box])
            for line in result.lines
        ]
    return result


async def _relay(head: GenerationChunk, stream, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
    """A generation's chunks after its first (``speech.relay``), its tokens recorded as the request's usage."""
    last = head
    chunks = relay(head, stream, deadline, "the answer")
    try:
        async for chunk in chunks:
            last = chunk
            yield chunk
    finally:
        usage.record_tokens(last.prompt_tokens, last.completion_tokens)  # a cancelled answer's tokens count too
        await chunks.aclose()
