"""The HTTP API: every request and response body as a pydantic model.

Limits come from ``deployments.settings`` and are written into the types, so
they show up in the OpenAPI docs at ``/docs`` and are enforced by validation.
Request models are flat (no nested models) so one schema describes both the
JSON body and the multipart form of a route.
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from deployments.settings import limits

_L = limits()

Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=_L.max_text_chars),
    Field(description="Non-empty text."),
]
Label = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=_L.max_label_chars),
    Field(description="A candidate label, free text (for example 'a photo of a cat')."),
]
Labels = Annotated[
    list[Label],
    Field(min_length=1, max_length=_L.max_labels, description="Candidate labels to rank."),
]
TopK = Annotated[int, Field(ge=1, le=_L.max_top_k, description="How many labels to return.")]
ImageB64 = Annotated[
    str,
    Field(
        description="The image file (JPEG, PNG, WebP, BMP, GIF or TIFF), base64-encoded. "
        "A data URL prefix is accepted.",
        examples=["iVBORw0KGgo..."],
    ),
]
Weight = Annotated[float, Field(ge=0.0, le=1.0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# --- requests ---------------------------------------------------------------


class VisionClassifyRequest(_Request):
    """Classify one image into ImageNet classes."""

    image: ImageB64
    top_k: TopK = 5
    embed: bool = Field(False, description="Also return the image's pooled feature vector.")


class TextEmbedRequest(_Request):
    """Embed texts as unit-length sentence vectors."""

    texts: Annotated[list[Text], Field(min_length=1, max_length=_L.max_texts)]


class TextClassifyRequest(_Request):
    """Zero-shot classification of a text against labels the caller gives."""

    text: Text
    labels: Labels


class MultimodalRequest(_Request):
    """Score labels against an image, a text, or both, and fuse the rankings."""

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

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels


# --- responses --------------------------------------------------------------


class LabelScore(_Response):
    label: str
    score: float = Field(
        description="Probability-like score in [0, 1]; scores of a ranking sum to 1 "
        "for label rankings, or are class probabilities for ImageNet classes."
    )


class VisionClassifyResponse(_Response):
    labels: list[LabelScore] = Field(description="Top-k ImageNet classes, best first.")
    embedding: list[float] | None = Field(None, description="Pooled image features, if asked for.")
    model: str
    version: str


class TextEmbedResponse(_Response):
    embeddings: list[list[float]]
    dim: int
    model: str
    version: str


class TextClassifyResponse(_Response):
    labels: list[LabelScore] = Field(description="All labels, best first.")
    model: str
    version: str


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
    method: str = Field(
        description="How image and text were compared: ConSE (convex combination of the "
        "embeddings of the image's top ImageNet classes in the text space) and weighted "
        "late fusion. Not CLIP."
    )


class ModelInfo(_Response):
    name: str
    deployment: str
    task: str
    source: str
    version: str
    device: str
    resources: dict[str, float] = Field(description="Ray resources held by the replica that answered.")
    torch_threads: int
    placement: dict = Field(
        default_factory=dict, description="Where the replica that answered runs: replica id, node id, GPU ids."
    )
    details: dict = Field(default_factory=dict)
    drift: dict | None = Field(
        None,
        description="Drift of the answering replica's recent traffic against the model's reference profile: "
        "status (ok, drift, collecting, disabled, no_reference), scores, thresholds, window.",
    )


class ModelsResponse(_Response):
    models: list[ModelInfo]


class Health(_Response):
    status: str
