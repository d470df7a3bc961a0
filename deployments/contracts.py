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
class FusionResult:
    vision_scores: np.ndarray | None  # (L,) ConSE scores of the labels against the image
    text_scores: np.ndarray | None  # (L,) scores of the labels against the text
    fused: np.ndarray  # (L,)
    weights: dict[str, float]


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
