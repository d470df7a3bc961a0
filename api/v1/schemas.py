"""The HTTP API: every request and response body as a pydantic model.

Limits come from ``deployments.settings`` and are written into the types, so
they show up in the OpenAPI docs at ``/docs`` and are enforced by the same
validation: what the schema calls valid is accepted, and what it calls invalid
is refused (the API is fuzzed against its own schema in the test suite).
Request models are flat (no nested models) so one schema describes both the
JSON body and the multipart form of a route.
"""

import functools
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from api.knowledge import KnowledgeSource, PolicyDecision
from api.openapi import Language, integral
from deployments.audio import OUTPUT_FORMATS
from deployments.settings import limits
from knowledge.rules import NAME_PATTERN

_L = limits()

# A text must contain a character that is not whitespace (as ``str.isspace()``
# defines it). Texts are used as sent, not stripped, so the length limit is the
# length the client sent. The class is spelled out character by character
# because regex engines disagree on ``\s`` (Python's includes U+001C-U+001F,
# ECMA's and Rust's do not), and the schema must mean the same to every client.
WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{WHITESPACE}]"

Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=_L.max_text_chars, pattern=NOT_BLANK),
    Field(description="Text with at least one character that is not whitespace."),
]
Label = Annotated[
    str,
    StringConstraints(min_length=1, max_length=_L.max_label_chars, pattern=NOT_BLANK),
    Field(description="A candidate label, free text (for example 'a photo of a cat')."),
]


def _distinct(labels: list[str]) -> list[str]:
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    return labels


Labels = Annotated[
    list[Label],
    Field(
        min_length=1,
        max_length=_L.max_labels,
        description="Candidate labels to rank, each different from the others.",
        json_schema_extra={"uniqueItems": True},
    ),
    AfterValidator(_distinct),
]


# Constraints before the validator: after it, pydantic writes them into the schema as `ge`/`le`, not `minimum`.
TopK = Annotated[int, Field(ge=1, le=_L.max_top_k, description="How many labels to return."), BeforeValidator(integral)]
# An 8x8 red PNG: a real image, so the schema's example is a request that works.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfHgA0wMeAAg1MCANDKARQfGKMRAAAAAElFTkSuQmCC"
)
# Base64 of the largest accepted image, plus room for a data URL prefix.
MAX_IMAGE_B64_CHARS = 4 * -(-_L.max_image_bytes // 3) + 128
ImageB64 = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_IMAGE_B64_CHARS,
        description="The image file (JPEG, PNG, WebP, BMP, GIF or TIFF), base64-encoded. "
        "A data URL prefix is accepted. Larger than the image limit: 413; not a decodable image: 422.",
        examples=[EXAMPLE_IMAGE],
        json_schema_extra={"contentEncoding": "base64"},
    ),
]
# What the multipart reader puts in the image field when the image came as a file.
IMAGE_PLACEHOLDER = "(multipart upload)"
Weight = Annotated[float, Field(ge=0.0, le=1.0)]


class _Request(BaseModel):
    # Strict: a value of the wrong JSON type ("5" for an integer, 0 for a boolean) is refused, as the schema says.
    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")

    @classmethod
    def from_form(cls, fields: dict[str, Any]) -> "_Request":
        """Validate multipart form fields, which are all text: numbers, booleans and null in their JSON spelling.

        ``top_k=5``, ``embed=true``, ``vision_weight=0.5``, ``text_weight=null``;
        anything else in such a field is refused by validation with the type it should have.
        """
        scalars = _scalar_fields(cls)
        return cls.model_validate({name: _json_scalar(v) if name in scalars else v for name, v in fields.items()})


@functools.cache
def _scalar_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields whose schema allows no string: their form values are read as JSON."""

    def allows_text(schema: dict) -> bool:
        return schema.get("type") in ("string", "array") or any(allows_text(s) for s in schema.get("anyOf", ()))

    return frozenset(n for n, s in model.model_json_schema()["properties"].items() if not allows_text(s))


def _json_scalar(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value, parse_constant=_refuse)  # no NaN or Infinity
    except ValueError:
        return value
    return parsed if parsed is None or isinstance(parsed, (bool, int, float)) else value


def _refuse(constant: str) -> None:
    raise ValueError(constant)


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# --- requests ---------------------------------------------------------------


MAX_CONCEPTS = 16
Concept = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=NOT_BLANK),
    Field(
        description="A concept of the knowledge graph: a WordNet noun ('dog', 'hot dog'), a synset name "
        "('dog.n.01') or a WordNet id ('n02084071'). A word with several senses means its most frequent one "
        "among the graph's (see the synset returned)."
    ),
]


def _distinct_concepts(concepts: list[str]) -> list[str]:
    if len(set(concepts)) != len(concepts):
        raise ValueError("concepts must be distinct")
    return concepts


class VisionClassifyRequest(_Request):
    """Classify one image into ImageNet classes, and optionally into broader concepts (roll-ups)."""

    image: ImageB64
    top_k: TopK = 5
    embed: bool = Field(False, description="Also return the image's pooled feature vector.")
    concepts: (
        Annotated[
            list[Concept],
            Field(
                min_length=1,
                max_length=MAX_CONCEPTS,
                description="Concepts at any level of the WordNet hierarchy ('animal', 'dog', 'vehicle', 'food'): "
                "each gets the probability that the image is one, the sum over the ImageNet classes below it. "
                "An unknown concept is refused (422) with close matches.",
                json_schema_extra={"uniqueItems": True},
            ),
            AfterValidator(_distinct_concepts),
        ]
        | None
    ) = None


class TextEmbedRequest(_Request):
    """Embed texts as unit-length sentence vectors."""

    texts: Annotated[list[Text], Field(min_length=1, max_length=_L.max_texts)]


class TextClassifyRequest(_Request):
    """Zero-shot classification of a text against labels the caller gives."""

    text: Text
    labels: Labels


class OcrRequest(_Request):
    """Read the text in one image."""

    image: ImageB64


PolicyName = Annotated[
    str,
    StringConstraints(pattern=NAME_PATTERN),
    Field(
        description="A policy of the service's config (GET /v1/policies) to check the models' answer with: the "
        "response carries its decision and the rules that fired; a `block` rule refuses the request (403).",
    ),
]
MAX_DESCRIPTION_TOKENS = 128


class DescribeRequest(_Request):
    """Describe one image in one or two sentences, from what the vision and OCR models found in it."""

    image: ImageB64
    max_tokens: Annotated[
        int,
        Field(ge=1, le=MAX_DESCRIPTION_TOKENS, description="Most tokens the description may have."),
        BeforeValidator(integral),
    ] = 60
    policy: PolicyName | None = None
    knowledge: bool = Field(
        False,
        description="Give the language model the knowledge graph's facts (WordNet: definition, what it is a kind "
        "of) about the classes recognised, returned in evidence.knowledge as the sources. Off by default: the "
        "facts help answers to questions (chat's `knowledge`), but a description given them tends to recite them.",
    )


MAX_GRID = 28
ClassName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=_L.max_label_chars, pattern=NOT_BLANK),
    Field(
        description="The class to explain, by its name in the vision model (an ImageNet class such as 'tabby' or "
        "'Egyptian cat', case-insensitive; GET /v1/vision/classify gives the names). Default: the top class. "
        "An unknown name is refused (422) with close matches."
    ),
]


class VisionExplainRequest(_Request):
    """Explain why the vision model gives an image a class: where in the image the evidence for it lies."""

    image: ImageB64
    label: ClassName | None = None
    method: Literal["gradcam", "integrated_gradients"] = Field(
        "gradcam",
        description="`gradcam`: Grad-CAM on the last feature map (one forward and one backward pass, coarse and "
        "fast); `integrated_gradients`: Integrated Gradients from the mean colour (`steps` passes, per pixel).",
    )
    steps: Annotated[
        int,
        Field(ge=1, le=_L.max_explain_steps, description="Integration steps of integrated_gradients."),
        BeforeValidator(integral),
    ] = 16
    grid: Annotated[
        int,
        Field(ge=1, le=MAX_GRID, description="The coarse map has grid x grid cells over the classified crop."),
        BeforeValidator(integral),
    ] = 7
    heatmap: bool = Field(True, description="Return the heatmap over the image as a PNG (base64).")


class TextExplainRequest(_Request):
    """Explain a zero-shot label of a text: each word's contribution to the label's score."""

    text: Text = Field(description="The text; at most max_explain_words words (64), each scored without it.")
    labels: Labels
    label: Label | None = Field(None, description="The label to explain, one of `labels`. Default: the top one.")


def _present(field: str) -> dict:
    return {"required": [field], "properties": {field: {"type": "string"}}}


FILES = {
    "image": (_L.max_image_bytes, "The image file (JPEG, PNG, WebP, BMP, GIF or TIFF)."),
    "audio": (_L.max_audio_bytes, "The audio file (WAV, FLAC, MP3, Ogg, WebM or MP4/M4A)."),
}
"""The fields a multipart form may carry as file uploads: their most bytes and what they are."""


def form_schema(model: type[BaseModel]) -> dict:
    """The schema of a route's multipart form: the JSON schema with the image (and audio) as file uploads."""
    schema = model.model_json_schema()
    files = [name for name in FILES if name in schema["properties"]]
    for name in files:
        most, description = FILES[name]
        schema["properties"][name] = {
            "type": "string", "format": "binary", "minLength": 1, "maxLength": most, "description": description,
        }  # fmt: skip

    def file_rules(node: Any) -> Any:
        # A form field cannot be null, so "the file is present" is all the rules need to say about a file.
        for name in files:
            if node == _present(name):
                return {"required": [name]}
        if isinstance(node, dict):
            return {key: file_rules(value) if key != "properties" else value for key, value in node.items()}
        return [file_rules(item) for item in node] if isinstance(node, list) else node

    return file_rules(schema)


def _not_zero(field: str) -> dict:
    """The field is absent, null, or a positive number (written without `not`, which fuzzers handle poorly)."""
    return {"properties": {field: {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0}]}}}


class MultimodalRequest(_Request):
    """Score labels against an image, a text, or both, and fuse the rankings.

    At least one of ``image`` and ``text``; and the weights of the modalities
    sent may not all be 0 (a weight of a modality not sent is ignored).
    """

    # The same rules as `_check`, in the schema.
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {"anyOf": [_present("image"), _present("text")]},
                {"anyOf": [_present("image"), _not_zero("text_weight")]},
                {"anyOf": [_present("text"), _not_zero("vision_weight")]},
                {"anyOf": [_not_zero("vision_weight"), _not_zero("text_weight")]},
            ],
        }
    )

    image: ImageB64 | None = None
    text: Text | None = None
    labels: Labels
    top_k: TopK = Field(5, description="How many ImageNet classes to return for the image.")
    vision_weight: Weight | None = Field(
        None, description="Weight of the image's label scores in the fusion (default from config)."
    )
    text_weight: Weight | None = Field(
        None, description="Weight of the text's label scores in the fusion (default from config)."
    )
    policy: PolicyName | None = None
    explain: bool = Field(
        False,
        description="Also return `explanation`: how each label's score was made, exactly. The fused score is the "
        "sum of each modality's weight times its score; the image's score comes from the cosine similarity of "
        "its ConSE embedding with the label, which is the sum of its top classes' contributions.",
    )

    @model_validator(mode="after")
    def _check(self) -> "MultimodalRequest":
        if self.image is None and self.text is None:
            raise ValueError("send an image, a text, or both")
        sent = {"vision_weight": self.image is not None, "text_weight": self.text is not None}
        weights = {name: getattr(self, name) for name, present in sent.items() if present}
        if all(weight == 0 for weight in weights.values()):
            raise ValueError(
                f"the fusion weights of the modalities sent ({', '.join(weights)}) are 0; "
                "give at least one of them a positive weight"
            )
        return self


MAX_AUDIO_B64_CHARS = 4 * -(-_L.max_audio_bytes // 3) + 128
AudioB64 = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_AUDIO_B64_CHARS,
        description="The audio file (WAV, FLAC, MP3, Ogg, WebM or MP4/M4A), base64-encoded. A data URL prefix is "
        f"accepted. Larger than the audio limit, or longer than {_L.max_audio_seconds:g} s: 413; not decodable: 422.",
        json_schema_extra={"contentEncoding": "base64"},
    ),
]
MAX_ANSWER_TOKENS = 256


class AskRequest(_Request):
    """A question, spoken (`audio`) and/or written (`text`), maybe about an `image`: heard, answered by the
    language model from what the vision and OCR models found in the image, and with `speak` said back."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [_present("audio"), _present("text"), _present("image")]})

    audio: AudioB64 | None = None
    image: ImageB64 | None = None
    text: Text | None = Field(None, description="The question as text, or words to add to the spoken one.")
    language: Language | None = None

    max_tokens: Annotated[
        int,
        Field(ge=1, le=MAX_ANSWER_TOKENS, description="Most tokens the answer may have."),
        BeforeValidator(integral),
    ] = 128
    speak: bool = Field(False, description="Also say the answer (the `tts` model): `speech` in the response.")
    voice: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        None, description="The voice to say it in (GET /v1/models: the tts model's `voices`); default: its voice."
    )
    speech_format: Literal[OUTPUT_FORMATS] = Field("wav", description="The format of the answer's audio.")
    policy: PolicyName | None = None
    knowledge: bool = Field(
        False,
        description="Give the language model the knowledge graph's facts about the image's classes and the "
        "concepts the question names; the response lists them as sources.",
    )

    @model_validator(mode="after")
    def _something_asked(self) -> "AskRequest":
        if self.audio is None and self.text is None and self.image is None:
            raise ValueError("send audio, a text, an image, or several of them")
        return self


# --- responses --------------------------------------------------------------


class LabelScore(_Response):
    label: str
    score: float = Field(
        description="Probability-like score in [0, 1]; scores of a ranking sum to 1 "
        "for label rankings, or are class probabilities for ImageNet classes."
    )


class ConceptScore(_Response):
    concept: str = Field(description="The concept as asked for.")
    synset: str = Field(description="The WordNet synset it names: its id, e.g. n02084071.")
    name: str = Field(description="The synset's name, e.g. dog.n.01.")
    definition: str = Field(description="The synset's definition (WordNet's gloss).")
    probability: float = Field(description="The probability that the image is one: the sum over its classes.")
    classes: int = Field(description="How many of the 1000 ImageNet classes are at or below it.")


class VisionClassifyResponse(_Response):
    labels: list[LabelScore] = Field(description="Top-k ImageNet classes, best first.")
    embedding: list[float] | None = Field(None, description="Pooled image features, if asked for.")
    concepts: list[ConceptScore] | None = Field(None, description="The concepts asked for, in the order asked.")
    model: str
    version: str
    variant: str = Field("stable", description="The variant that answered: stable, or its rollout's candidate.")


class TextEmbedResponse(_Response):
    embeddings: list[list[float]]
    dim: int
    model: str
    version: str


class TextClassifyResponse(_Response):
    labels: list[LabelScore] = Field(description="All labels, best first.")
    model: str
    version: str


class PolicyRule(_Response):
    id: str
    action: str = Field(description="flag, block, annotate, route or mask.")
    priority: int


class PolicySummary(_Response):
    name: str
    description: str
    concepts: list[str]
    rules: list[PolicyRule] = Field(description="In the order they run.")


class PoliciesResponse(_Response):
    policies: list[PolicySummary]
    update_error: str | None = Field(
        None, description="Why the last change of the policies was refused (the ones listed stayed in force)."
    )


class ClassContribution(_Response):
    label: str = Field(description="An ImageNet class of the image's ConSE embedding.")
    contribution: float = Field(description="Its part of the label's similarity.")


class VisionPart(_Response):
    score: float = Field(description="The image's score of the label: softmax(similarity / temperature).")
    similarity: float = Field(description="Cosine of the image's ConSE embedding with the label: the sum of classes.")
    classes: list[ClassContribution] = Field(description="Each class's part of the similarity, by weight.")


class TextPart(_Response):
    score: float = Field(description="The text's score of the label: softmax(similarity / temperature).")
    similarity: float = Field(description="Cosine of the text's embedding with the label.")


class LabelExplanation(_Response):
    label: str
    score: float = Field(description="The fused score: the sum of `parts`.")
    parts: dict[str, float] = Field(description="Each modality's weight times its score.")
    vision: VisionPart | None = None
    text: TextPart | None = None


class ConseClass(_Response):
    label: str = Field(description="An ImageNet class among the image's top classes (fusion's top_t).")
    probability: float = Field(description="Its probability for the image.")
    weight: float = Field(description="Its weight in the image's ConSE embedding (probabilities renormalised).")


class MultimodalExplanation(_Response):
    method: str
    temperature: float = Field(description="Softmax temperature over each modality's similarities.")
    weights: dict[str, float] = Field(description="The fusion weights applied, per modality present.")
    classes: list[ConseClass] = Field(description="The classes that make the image's ConSE embedding.")
    labels: list[LabelExplanation] = Field(description="Every label, best first, with how its score was made.")


class VisionBranch(_Response):
    classes: list[LabelScore] = Field(description="Top-k ImageNet classes of the image.")
    labels: list[LabelScore] = Field(description="The labels scored against the image by ConSE.")


class TextBranch(_Response):
    labels: list[LabelScore] = Field(description="The labels scored against the text.")


class MultimodalResponse(_Response):
    vision: VisionBranch | None
    text: TextBranch | None
    fused: list[LabelScore] = Field(description="All labels, best first, after late fusion.")
    weights: dict[str, float] = Field(description="Fusion weights applied, per modality present.")
    policy: PolicyDecision | None = Field(None, description="The decision of the policy asked for.")
    explanation: MultimodalExplanation | None = Field(None, description="With `explain`: how the scores were made.")
    method: str = Field(
        description="How image and text were compared: ConSE (convex combination of the "
        "embeddings of the image's top ImageNet classes in the text space) and weighted "
        "late fusion. Not CLIP."
    )


class TextLine(_Response):
    text: str = Field(description="The line as read.")
    confidence: float = Field(description="The recogniser's confidence in the line, in [0, 1].")
    box: list[list[float]] = Field(
        description="The line's four corners [x, y] in the uploaded image's pixels, clockwise from its top left "
        "(as the text runs)."
    )


class OcrResponse(_Response):
    lines: list[TextLine] = Field(
        description="Lines of text in reading order (top to bottom, then left to right); empty if none."
    )
    truncated: bool = Field(description="More lines were found than the OCR deployment returns (its max_lines).")
    width: int = Field(description="Width of the uploaded image, in pixels.")
    height: int = Field(description="Height of the uploaded image, in pixels.")
    model: str
    version: str


class DescriptionEvidence(_Response):
    classes: list[LabelScore] = Field(
        description="The ImageNet classes the description was given, most likely first: at most 3, each with a "
        "probability of at least 0.1."
    )
    text: list[TextLine] = Field(description="The lines OCR read, in reading order.")
    text_truncated: bool = Field(description="The text read was longer than the prompt holds (400 characters).")
    prompt: str = Field(description="The evidence exactly as the language model read it.")
    knowledge: list[KnowledgeSource] = Field(
        description="The knowledge graph's facts the language model was given, with their synsets (sources)."
    )


class DescribeUsage(_Response):
    prompt_tokens: int
    completion_tokens: int


class DescribeResponse(_Response):
    description: str = Field(description="One or two sentences about the image, written from the evidence only.")
    finish_reason: Literal["stop", "length"] = Field(description="`length`: cut at max_tokens.")
    evidence: DescriptionEvidence
    models: dict[str, str] = Field(description="The model and version each step ran: vision, ocr, llm.")
    usage: DescribeUsage
    seconds: dict[str, float] = Field(
        description="Time waiting for each model: vision and ocr (in parallel), then llm."
    )
    policy: PolicyDecision | None = Field(None, description="The decision of the policy asked for.")
    method: str = Field(
        description="How the description was made: not a trained captioning model, but a language model "
        "prompted with what an ImageNet classifier and OCR found (grounded prompting)."
    )


class HeardSpeech(_Response):
    text: str = Field(description="What the audio said, as the asr model heard it (masked where masking is on).")
    language: str = Field(description="Its language (ISO 639-1).")
    duration: float = Field(description="Seconds of audio.")


class SpokenAnswer(_Response):
    format: str
    audio: str = Field(description="The answer said, base64-encoded.")
    duration: float = Field(description="Seconds of speech.")


class AskUsage(_Response):
    prompt_tokens: int
    completion_tokens: int
    audio_seconds_heard: float
    audio_seconds_spoken: float


class AskResponse(_Response):
    question: str = Field(description="What the language model was asked: the transcript, then the text.")
    transcript: HeardSpeech | None = None
    answer: str
    finish_reason: Literal["stop", "length"] = Field(description="`length`: cut at max_tokens.")
    speech: SpokenAnswer | None = None
    evidence: DescriptionEvidence | None = Field(None, description="What vision and OCR found in the image.")
    knowledge: list[KnowledgeSource] | None = Field(None, description="The facts given, with knowledge.")
    policy: PolicyDecision | None = Field(None, description="The decision of the policy asked for.")
    models: dict[str, str] = Field(description="The model and version each stage ran: asr, vision, ocr, llm, tts.")
    usage: AskUsage
    seconds: dict[str, float] = Field(
        description="Time waiting for each stage: asr, and vision and ocr, in parallel; then llm; then tts."
    )


class ExplainedClass(_Response):
    label: str = Field(description="The class explained.")
    index: int = Field(description="Its index among the model's classes.")
    probability: float = Field(description="Its probability for the image.")


class VisionExplainResponse(_Response):
    explained: ExplainedClass
    method: str
    parameters: dict[str, Any] = Field(description="The method's parameters, as run.")
    grid: list[list[float]] = Field(
        description="The saliency's share in each cell of a grid over the crop (rows top to bottom); sums to 1."
    )
    heatmap_png: str | None = Field(
        None, description="The saliency in colour (blue low, red high) over the crop, as a base64 PNG."
    )
    region: list[float] = Field(
        description="The crop the model classified and the map covers: [x, y, width, height] in the upload's "
        "pixels (the classifier sees the centre square of the image)."
    )
    model: str
    version: str
    seconds: float = Field(description="Time of the explanation in the explainer replica.")


class WordScore(_Response):
    word: str
    start: int = Field(description="Index of its first character in the text.")
    contribution: float = Field(
        description="The label's score with the word minus its score without it: positive words support the label."
    )


class TextExplainResponse(_Response):
    label: str = Field(description="The label explained.")
    score: float = Field(description="Its score for the whole text, as /v1/text/classify gives it.")
    words: list[WordScore] = Field(description="Every word, in text order.")
    ranking: list[str] = Field(description="The words by contribution, largest first (ties in text order).")
    method: str
    parameters: dict[str, Any]
    model: str
    version: str
    seconds: float


class Health(_Response):
    status: Literal["ok"]


class DeploymentReadiness(_Response):
    ready: bool
    model: str | None = Field(None, description="The model a replica that answered serves.")
    version: str | None = None
    message: str | None = Field(
        None,
        description="Why the deployment is not ready; for a ready one, that it is busy (its replicas are running "
        "but none answered in time).",
    )


class Readiness(_Response):
    status: Literal["ready", "not_ready"]
    deployments: dict[str, DeploymentReadiness]


class ErrorDetail(_Response):
    loc: list[str | int] = Field(description="Where the problem is: ['body', field, ...], or [] for the request.")
    msg: str = Field(description="What was wrong, for a human.")
    type: str = Field(description="A stable error type, e.g. invalid_image, payload_too_large, overloaded.")
    ctx: dict | None = Field(None, description="The rule's parameters, for validation errors (e.g. the limit).")


class ErrorResponse(_Response):
    detail: list[ErrorDetail]
