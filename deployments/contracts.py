"""The values that cross deployment boundaries: what the vision and text replicas answer, what fusion takes
and gives back.

Model code, the fusion replica, the ingress and the batch job import them from here, so none of them has to
import another deployment's model-loading code to speak to it. Plain dataclasses of numpy arrays and
Python values: Ray pickles them between processes.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class VisionResult:
    labels: list[tuple[str, float]]  # top-k (class name, probability), best first
    probs: np.ndarray  # (num_classes,) float32
    embedding: np.ndarray | None
    model: str
    version: str
    batch_size: int = 1  # how many requests shared the forward pass that produced this


@dataclass
class TextEmbeddings:
    vectors: np.ndarray  # (n, dim) float32, unit length
    model: str
    version: str
    tokens: int = 0  # tokens the model read for the texts embedded (cached label vectors count none)


@dataclass
class TextRanking:
    labels: list[tuple[str, float]]  # (label, score), best first
    model: str
    version: str


@dataclass
class FusionInput:
    vision: VisionResult | None
    label_embeddings: np.ndarray  # (L, D)
    text_embedding: np.ndarray | None  # (D,)
    weights: dict[str, float]
    class_embeddings: np.ndarray | None = None  # (C, D): the vision model's class names in the text model's space


@dataclass
class FusionExplanation:
    """How fusion's scores were made, exactly (``scoring.conse_decomposition``).

    For label ``j``: ``fused[j] = sum over modalities m of weights[m] * scores_m[j]``; the image's score is
    ``softmax(vision_similarity / temperature)[j]``, and ``vision_similarity[j]`` is the sum of
    ``class_contributions[:, j]``; the text's score is ``softmax(text_similarity / temperature)[j]``.
    """

    temperature: float
    classes: list[tuple[str, float, float]]  # ConSE's top-T classes: (name, probability, weight in the mix)
    class_contributions: np.ndarray | None  # (T, L) each class's part of each label's similarity
    vision_similarity: np.ndarray | None  # (L,) cosine of the image's ConSE embedding with each label
    text_similarity: np.ndarray | None  # (L,) cosine of the text's embedding with each label


@dataclass
class FusionResult:
    vision_scores: np.ndarray | None  # (L,) ConSE scores of the labels against the image
    text_scores: np.ndarray | None  # (L,) scores of the labels against the text
    fused: np.ndarray  # (L,)
    weights: dict[str, float]
    explanation: FusionExplanation | None = None  # when asked for


@dataclass
class GenerationRequest:
    """A request to the language model: a chat (``messages``) or a raw ``prompt``, and how to sample."""

    messages: list[dict[str, str]] | None = None  # {"role": system|user|assistant, "content": str}
    prompt: str | None = None
    max_tokens: int | None = None  # None: the deployment's default
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None  # strings that end the answer; not part of it


@dataclass
class GenerationChunk:
    """One piece of a streamed answer. The first has no text (the request was accepted: its prompt counted);
    the last has ``finish_reason``."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # so far
    model: str
    version: str
    finish_reason: str | None = None  # "stop" or "length"


@dataclass
class OcrLine:
    text: str
    confidence: float
    box: list[tuple[float, float]]  # four corners (x, y) in pixels, clockwise from the top left of the text


@dataclass
class OcrResult:
    lines: list[OcrLine]  # in reading order: top to bottom, left to right
    truncated: bool  # more lines were found than the deployment's max_lines
    model: str
    version: str
    seconds: float  # the replica's time per image of the batch this was read in
    batch_size: int = 1


MAX_GROUP_SIZE = 64
"""The most calls one group call carries (``pipelines/grouping.py``, ``ModelDeployment.call_group``)."""

IMAGE_METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients")
"""The explainer's saliency methods (``explain_image``'s ``method``)."""
DEFAULT_STEPS = 16
"""Integrated Gradients' steps when a request names none."""


@dataclass
class ImageExplanation:
    """Why the vision model gave an image a class: a saliency map over the crop it classified."""

    saliency: np.ndarray | None  # (crop, crop) float32 in [0, 1]; not sent back by the deployment (the grid is)
    class_index: int
    class_name: str
    probability: float  # of that class for this image
    method: str  # "gradcam" or "integrated_gradients"
    parameters: dict  # the method's, as run
    model: str
    version: str
    seconds: float  # in the explainer replica
    grid: np.ndarray | None = None  # (G, G) float32: the map's share in each cell, summing to 1
    heatmap_png: bytes | None = None  # the map in colour over the crop


@dataclass
class WordContribution:
    word: str
    start: int  # its first character's index in the text
    contribution: float  # the label's score with the word minus without it


@dataclass
class TextExplanation:
    """Why a text got a zero-shot label: each word's contribution to the label's score, in text order."""

    words: list[WordContribution]
    label: str
    score: float  # the label's score for the whole text
    method: str
    parameters: dict
    model: str
    version: str
    seconds: float
