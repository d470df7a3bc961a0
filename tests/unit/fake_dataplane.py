"""A dataplane without Ray, for testing the routers through FastAPI's TestClient.

Images are really decoded and prepared (so the limits and error paths are the real ones); the models answer
with fixed, recognisable values computed from their inputs, so a test can tell which input produced which
output.
"""

import asyncio
import json

import numpy as np
from fastapi.testclient import TestClient

from api.app import build_app
from api.context import ApiSettings
from deployments.admission import Admission
from deployments.audio import AudioEncoder
from deployments.contracts import (
    FusionExplanation,
    FusionResult,
    GenerationChunk,
    GenerationRequest,
    ImageExplanation,
    OcrLine,
    OcrResult,
    SpeechChunk,
    SpeechRequest,
    TextEmbeddings,
    TextExplanation,
    TextRanking,
    TextScores,
    TokenLogprob,
    TranscriptionRequest,
    TranscriptPiece,
    TranscriptSegment,
    TranscriptWord,
    VisionResult,
    WordContribution,
)
from deployments.errors import InvalidInput, ModelUnavailable
from deployments.imaging import ImageSpec, Interpolation, crop_region
from deployments.relevance import PAIRING, cosine_pairs, paired
from deployments.words import check_words, words
from knowledge.graph import knowledge_graph
from pipelines import grounding, usage
from pipelines.dataplane import Analysis, Dataplane, Looked, PreparedImage, decode_and_prepare
from pipelines.registry import ModelRegistry
from pipelines.rollouts import Rollouts
from pipelines.speech import _masked_pieces

SPEC = ImageSpec(8, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), Interpolation.bilinear)
CLASSES = [f"class{i}" for i in range(10)]
DIM = 4
VERSIONS = {
    "vision": "vision-weights==1/abc",
    "text": "text==2",
    "fusion": "conse-top10",
    "ocr": "ocr==4/abc",
    "llm": "llm==3/def",
    "explainer": "vision-weights==1/abc",
    "asr": "whisper==5/fed",
    "tts": "voice==6/cba",
}
DETAILS = {
    "vision": {"embedding_dim": 3},
    "text": {"dim": DIM},
    "fusion": {},
    "ocr": {"max_lines": 200},
    "llm": {"context_tokens": 64},
    "explainer": {"image_methods": ["gradcam", "integrated_gradients"]},
    "asr": {"sample_rate": 16000},
    "tts": {"voice": "joe", "voices": ["joe"], "sample_rate": 22050},
}
VOICE = "joe"
VOICE_RATE = 22050
MAX_TOKENS_CAP = 100


class _Method:
    def __init__(self, answer):
        self.answer = answer

    def remote(self, *args, **kwargs):
        async def call():
            return self.answer() if callable(self.answer) else self.answer

        return call()


class FakeHandle:
    def __init__(self, name: str, ready=True):
        self.deployment_name, self.app_name = name, "multimodal"

        def readiness():
            if ready is not True:
                raise ready
            return {"model": f"{name}-model", "version": VERSIONS[name]}

        self.ready = _Method(readiness)
        self.info = _Method(
            {
                "name": f"{name}-model",
                "created": 1700000000,
                "task": "test",
                "source": "test",
                "version": VERSIONS[name],
                "device": "cpu",
                "resources": {},
                "torch_threads": 1,
                "details": DETAILS[name],
            }
        )


class FakeDataplane:
    """What the routers call, answering from the inputs: an image's class is its mean red level mod 10."""

    def __init__(self, unavailable: set[str] = frozenset()):
        self.models = ModelRegistry(
            {name: FakeHandle(name, ModelUnavailable("starting") if name in unavailable else True) for name in VERSIONS}
        )
        self.unavailable = unavailable
        self.calls: list[tuple] = []
        self.knowledge = knowledge_graph()
        self.policies, self.policy_update_error = {}, None
        self.rollouts = Rollouts()  # none configured

    def observe_generation(self, route: str, response_format: str, tool_choice: str) -> None:
        self.calls.append(("observe_generation", route, response_format, tool_choice))

    def _check(self, model: str) -> None:
        if model in self.unavailable:
            raise ModelUnavailable("no model replica answered within the request's deadline; retry")

    async def prepare_image(self, route, deadline, raw=None, image_b64=None) -> np.ndarray:
        return (await asyncio.to_thread(decode_and_prepare, raw, image_b64, SPEC)).pixels

    async def prepare_views(self, route, deadline, raw=None, image_b64=None, vision=True, ocr=False) -> PreparedImage:
        return await asyncio.to_thread(decode_and_prepare, raw, image_b64, SPEC if vision else None, ocr)

    async def read_text(self, image: PreparedImage, deadline) -> OcrResult:
        self._check("ocr")
        self.calls.append(("read_text", image.page.shape))
        return ocr_result(image.page)

    async def look(self, image: PreparedImage, deadline, knowledge: bool = False) -> Looked:
        self._check("vision")
        self._check("ocr")
        vision, lines = vision_result(image.pixels, 5, False), ocr_result(image.page)
        facts = self.class_facts(vision) if knowledge else []
        return Looked(vision, lines, grounding.gather(vision.labels, lines.lines, facts), {"vision": 0.01, "ocr": 0.02})

    # The real graph over the fakes above: the prompts the language model gets are the real ones.
    describe = Dataplane.describe
    chat = Dataplane.chat
    ask = Dataplane.ask
    # Audio is really decoded (the limits and errors are the real ones); the models are fakes (below).
    prepare_audio = Dataplane.prepare_audio
    prepare_samples = Dataplane.prepare_samples
    _audio = Dataplane._audio
    refused_text = Dataplane.refused_text
    transcribe = Dataplane.transcribe
    metrics = None
    _decoder = None  # the event loop's default executor
    last_user_text = staticmethod(Dataplane.last_user_text)
    named_facts = Dataplane.named_facts
    class_facts = Dataplane.class_facts
    concepts = Dataplane.concepts
    rollups = Dataplane.rollups
    policy = Dataplane.policy
    judge = Dataplane.judge
    _classes = Dataplane._classes
    _imagenet = Dataplane._imagenet

    async def classify(self, pixels, top_k, embed, deadline) -> VisionResult:
        self._check("vision")
        self.calls.append(("classify", top_k, embed))
        return vision_result(pixels, top_k, embed)

    async def classify_many(self, images, top_k, embed, deadline) -> list[VisionResult]:
        self._check("vision")
        self.calls.append(("classify_many", len(images), top_k, embed))
        return [vision_result(p, top_k, embed) for p in images]

    async def embed(self, texts, deadline) -> TextEmbeddings:
        self._check("text")
        tokens = sum(len(t.split()) for t in texts)
        return TextEmbeddings(np.stack([text_vector(t) for t in texts]), "text-model", VERSIONS["text"], tokens)

    async def score(self, queries, documents, deadline) -> TextScores:
        """The cosine of the fake embeddings (``embed``'s vectors), as the bi-encoder scores pairs."""
        self.calls.append(("score", list(queries), list(documents)))
        if not paired(len(queries), len(documents)):
            raise InvalidInput(PAIRING, field="text_2")
        embedded = await self.embed([*queries, *documents], deadline)
        scores = cosine_pairs(embedded.vectors[: len(queries)], embedded.vectors[len(queries) :])
        return TextScores(scores.tolist(), "text-model", VERSIONS["text"], embedded.tokens)

    async def generate(self, request: GenerationRequest, deadline):
        """Answers "you said <the last message or prompt>", a word per token, as the deployment streams."""
        self._check("llm")
        self.calls.append(("generate", request))
        if request.max_tokens is not None and request.max_tokens > MAX_TOKENS_CAP:
            raise InvalidInput(f"max_tokens is {request.max_tokens}; at most {MAX_TOKENS_CAP}", field="max_tokens")
        said = request.messages[-1]["content"] if request.messages else request.prompt
        words = ["you", " said", *(" " + w for w in said.split())]
        if said.startswith("say:"):  # answers exactly what follows, five characters a token
            words = [said[4 + i : 9 + i] for i in range(0, len(said) - 4, 5)]
        limit = request.max_tokens or 16
        prompt = (
            sum(len((m["content"] or "").split()) for m in request.messages) if request.messages else len(said.split())
        )

        def scored(word: str) -> list[TokenLogprob] | None:
            """Log probabilities, as the deployment gives them when asked: the word, and ``x`` after it."""
            if request.logprobs is None:
                return None
            top = [(word, list(word.encode()), -0.25), ("x", [120], -2.0)][: request.logprobs]
            return [TokenLogprob(word, list(word.encode()), -0.25, top)]

        async def chunks():
            n = 0
            try:
                yield GenerationChunk("", prompt, 0, "llm-model", VERSIONS["llm"])
                for n, word in enumerate(words[:limit], start=1):
                    if any(stop in word for stop in request.stop or []):
                        yield GenerationChunk("", prompt, n, "llm-model", VERSIONS["llm"], "stop")
                        return
                    last = n == min(limit, len(words))
                    reason = None if not last else ("length" if limit < len(words) else "stop")
                    yield GenerationChunk(word, prompt, n, "llm-model", VERSIONS["llm"], reason, scored(word))
            finally:
                usage.record_tokens(prompt, n)  # as the real dataplane's relay does

        return chunks()

    async def transcribe_stream(self, audio, request: TranscriptionRequest, deadline):
        """Hears "a sound of <seconds> seconds" (its duration, to one decimal), one word a segment of 0.5 s each;
        a request's language is the one it names, else "en"; a translation says it in upper case."""
        self._check("asr")
        self.calls.append(("transcribe", request.task, request.language, request.word_timestamps))
        usage.record_audio(audio.duration_s)
        said = f"a sound of {audio.duration_s:.1f} seconds"
        if request.task == "translate":
            said = said.upper()
        language = request.language or "en"

        async def pieces():
            yield TranscriptPiece(language, 0.99, audio.duration_s, "asr-model", VERSIONS["asr"])
            for index, word in enumerate(said.split()):
                start, end = index * 0.5, index * 0.5 + 0.5
                words = [TranscriptWord(" " + word, start, end, 0.9)] if request.word_timestamps else None
                segment = TranscriptSegment(index, 0, start, end, " " + word, [index], 0.0, -0.1, 1.0, 0.01, words)
                yield TranscriptPiece(language, 0.99, audio.duration_s, "asr-model", VERSIONS["asr"], segment)
            yield TranscriptPiece(language, 0.99, audio.duration_s, "asr-model", VERSIONS["asr"], done=True)

        return _masked_pieces(pieces()) if usage.masker() is not None else pieces()

    async def speak(self, request: SpeechRequest, deadline):
        """Says a 440 Hz tone of 0.1 s per character, a chunk per sentence, encoded as asked."""
        self._check("tts")
        self.calls.append(("speak", request.text, request.voice, request.format, request.speed))
        if request.voice is not None and request.voice != VOICE:
            raise InvalidInput(f"no such voice; the voices are: {VOICE}", field="voice")
        (text,) = await usage.private([request.text])
        encoder = AudioEncoder(request.format, VOICE_RATE, whole=request.whole)
        lines = [line for line in text.split(". ") if line.strip()]

        async def chunks():
            said = 0.0
            try:
                yield SpeechChunk(b"", 0.0, "tts-model", VERSIONS["tts"], VOICE_RATE)
                for line in lines:
                    samples = round(0.1 * len(line) * VOICE_RATE / request.speed)
                    tone = (np.sin(np.arange(samples) * 2 * np.pi * 440 / VOICE_RATE) * 8000).astype(np.int16)
                    said += samples / VOICE_RATE
                    yield SpeechChunk(encoder.feed(tone), samples / VOICE_RATE, "tts-model", VERSIONS["tts"],
                                      VOICE_RATE)  # fmt: skip
                yield SpeechChunk(encoder.finish(), 0.0, "tts-model", VERSIONS["tts"], VOICE_RATE, done=True)
            finally:
                usage.record_audio(said)

        return chunks()

    async def zero_shot(self, text, labels, deadline) -> TextRanking:
        self._check("text")
        scores = label_scores(text, labels)
        ranked = sorted(zip(labels, scores.tolist()), key=lambda pair: -pair[1])
        return TextRanking(ranked, "text-model", VERSIONS["text"])

    async def analyze(
        self, pixels, text, labels, deadline, top_k=5, vision_weight=None, text_weight=None, explain=False
    ):
        self._check("fusion")
        self.calls.append(("analyze", text, tuple(labels), vision_weight, text_weight))
        image = vision_result(pixels, top_k, False) if pixels is not None else None
        vision_scores = label_scores(image.labels[0][0], labels) if image is not None else None
        text_scores = label_scores(text, labels) if text is not None else None
        present = [s for s in (vision_scores, text_scores) if s is not None]
        fused = np.mean(present, axis=0).astype(np.float32)
        weights = {"vision": 0.5, "text": 0.5} if len(present) == 2 else {("vision" if image else "text"): 1.0}
        result = FusionResult(vision_scores, text_scores, fused, weights)
        if explain:
            result.explanation = fusion_explanation(image, vision_scores, text_scores)
        return Analysis(result, image)

    async def explain_image(self, pixels, label, method, steps, grid, heatmap, deadline) -> ImageExplanation:
        """The class explained is the image's fake class (or the one named); all saliency in the first cell."""
        self._check("explainer")
        self.calls.append(("explain_image", label, method, steps, grid, heatmap))
        index = image_class(pixels) if label is None else CLASSES.index(label) if label in CLASSES else None
        if index is None:
            raise InvalidInput("unknown class", field="label")
        cells = np.zeros((grid, grid), np.float32)
        cells[0, 0] = 1.0
        parameters = {"steps": steps} if method == "integrated_gradients" else {"layer": "features"}
        return ImageExplanation(None, index, CLASSES[index], 0.5, method, parameters, "vision-model",
                                VERSIONS["vision"], 0.01, cells, b"\x89PNG" if heatmap else None)  # fmt: skip

    def crop_region(self, image: PreparedImage):
        return crop_region(image.size, SPEC.resize_size, SPEC.crop_size)

    async def explain_text(self, text, labels, label, deadline) -> TextExplanation:
        """A word's contribution is its length if it is a label's first word, else 0."""
        check_words(text)
        self._check("explainer")
        chosen = label or labels[0]
        found = [
            WordContribution(w.group(), w.start(), float(len(w.group())) if w.group() == chosen.split()[0] else 0.0)
            for w in words(text)
        ]
        return TextExplanation(found, chosen, 0.9, "occlusion", {}, "text-model", VERSIONS["text"], 0.01)


def fusion_explanation(image, vision_scores, text_scores, temperature: float = 0.05) -> FusionExplanation:
    """Similarities whose softmax gives the scores, the image's split evenly between its first two classes."""
    contributions, vision_similarity, text_similarity, classes = None, None, None, []
    if image is not None:
        vision_similarity = temperature * np.log(vision_scores.astype(np.float64))
        contributions = np.stack([vision_similarity / 2, vision_similarity / 2])
        classes = [(name, p, 0.5) for name, p in image.labels[:2]]
    if text_scores is not None:
        text_similarity = temperature * np.log(text_scores.astype(np.float64))
    return FusionExplanation(temperature, classes, contributions, vision_similarity, text_similarity)


def image_class(pixels: np.ndarray) -> int:
    return int(pixels[..., 0].mean()) % len(CLASSES)


def vision_result(pixels: np.ndarray, top_k: int, embed: bool) -> VisionResult:
    best = image_class(pixels)
    order = [(best + i) % len(CLASSES) for i in range(top_k)]
    probs = np.zeros(1000, np.float32)  # the fake classes are the first ten of ImageNet's thousand
    for rank, index in enumerate(order):
        probs[index] = 0.5 ** (rank + 1)
    embedding = np.array([best, pixels.mean(), 1.0], np.float32) if embed else None
    return VisionResult(
        [(CLASSES[i], float(probs[i])) for i in order], probs, embedding, "vision-model", VERSIONS["vision"]
    )


def ocr_result(page: np.ndarray) -> OcrResult:
    """An image whose mean green level is over 128 has one line of text, naming that level and its height."""
    green = int(page[..., 1].mean())
    height, width = page.shape[:2]
    lines = [OcrLine(f"GREEN {green}", 0.9, [(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)])]
    return OcrResult(lines if green > 128 else [], False, "ocr-model", VERSIONS["ocr"], 0.02)


def text_vector(text: str) -> np.ndarray:
    vector = np.array([len(text), text.count("a"), text.count("e"), 1.0], np.float32)
    return vector / np.linalg.norm(vector)


def label_scores(text: str, labels: list[str]) -> np.ndarray:
    """Labels sharing more characters with the text score higher; scores sum to 1."""
    raw = np.array([len(set(text) & set(label)) + 1.0 for label in labels], np.float32)
    return raw / raw.sum()


def events(response) -> list:
    """The SSE ``data:`` payloads of a response, ``[DONE]`` as a string."""
    payloads = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def client(dataplane=None, admission: dict | None = None, guard=None, audit=None) -> TestClient:
    app = build_app(
        dataplane or FakeDataplane(), Admission(admission or {}), ApiSettings(), NullMetrics(), guard, audit
    )
    return TestClient(app, raise_server_exceptions=False)


class NullMetrics:
    def __init__(self):
        self.requests: list[tuple] = []

    def observe_request(self, route, status, seconds, error_type) -> None:
        self.requests.append((route, status, error_type))

    def observe_image(self, *args) -> None:
        pass
