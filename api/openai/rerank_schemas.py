"""Request and response bodies of ``/v1/rerank`` (the shape Cohere, Jina and vLLM share) and ``/v1/score``
(vLLM's).

Bounded as ``/v1/embeddings``' inputs are, since every text is embedded as one of those: a query and each
document at most ``max_text_chars`` characters and not empty, at most ``max_texts`` documents, or texts on
each side of a score (``deployments.settings``: ``MAAS_MAX_TEXT_CHARS``, ``MAAS_MAX_TEXTS``). As on the other
OpenAI routes, a field this service does not know is refused by name (Cohere's ``max_tokens_per_doc``,
vLLM's ``truncate_prompt_tokens``): a text longer than the model's window is truncated there, always.
"""

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, ValidationInfo, field_validator

from api.openai.schemas import EmbeddingText, Request, Usage
from api.openapi import integral
from deployments.relevance import PAIRING, paired
from deployments.settings import limits

_L = limits()
MODEL = "`text`, the sentence encoder, as `GET /v1/models` lists it."


class Document(Request):
    text: EmbeddingText


def _document_kind(document) -> str | None:
    return "str" if isinstance(document, str) else "Document" if isinstance(document, (dict, Document)) else None


def _texts_kind(texts) -> str | None:
    return "str" if isinstance(texts, str) else "list" if isinstance(texts, list) else None


# Tagged unions, so a bad item is reported once, where it is: the tags are names error messages leave out of
# the field path (``documents.3.text``, ``text_2.1``).
DocumentInput = Annotated[
    Union[Annotated[EmbeddingText, Tag("str")], Annotated[Document, Tag("Document")]],
    Discriminator(
        _document_kind,
        custom_error_type="invalid_document",
        custom_error_message='a document must be a string or an object {"text": "..."}',
    ),
]
Texts = Annotated[
    Union[
        Annotated[EmbeddingText, Tag("str")],
        Annotated[list[EmbeddingText], Field(min_length=1, max_length=_L.max_texts), Tag("list")],
    ],
    Discriminator(
        _texts_kind, custom_error_type="invalid_texts", custom_error_message="must be a string or a list of strings"
    ),
]


class RerankRequest(Request):
    model: str = Field(description=MODEL)
    query: EmbeddingText = Field(description="What the documents are ranked by relevance to.")
    documents: Annotated[list[DocumentInput], Field(min_length=1, max_length=_L.max_texts)] = Field(
        description=f"The texts to rank: strings, or objects `{{\"text\": ...}}` (Jina's and Cohere v1's form); at "
        f"most {_L.max_texts} (`MAAS_MAX_TEXTS`), each at most {_L.max_text_chars} characters "
        "(`MAAS_MAX_TEXT_CHARS`)."
    )
    top_n: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = Field(
        None, description="Return only the most relevant `top_n` documents (unset, or more than sent: all)."
    )
    return_documents: bool = Field(
        False,
        description="Whether each result carries its document's text. Cohere's default (false): a result's "
        "`index` names the document sent, and the response is not as large again as the request. Jina and vLLM "
        "send the text by default; ask for it with `true`.",
    )

    def texts(self) -> list[str]:
        return [document if isinstance(document, str) else document.text for document in self.documents]


class ScoreRequest(Request):
    model: str = Field(description=MODEL)
    text_1: Texts = Field(
        description="The query: one text (a string, or a list of one) for every `text_2`, or a list of one per "
        "`text_2` (vLLM's rule: 1:1, 1:N or N:N)."
    )
    text_2: Texts = Field(
        description=f"The texts to score against `text_1`: at most {_L.max_texts} (`MAAS_MAX_TEXTS`), as `text_1`, "
        f"each at most {_L.max_text_chars} characters (`MAAS_MAX_TEXT_CHARS`)."
    )

    @field_validator("text_2")
    @classmethod
    def _paired(cls, text_2: str | list[str], info: ValidationInfo) -> str | list[str]:
        text_1 = info.data.get("text_1")  # absent when it was refused itself
        if text_1 is not None and not paired(len(_listed(text_1)), len(_listed(text_2))):
            raise ValueError(PAIRING)
        return text_2

    def pairs(self) -> tuple[list[str], list[str]]:
        """The queries (one for all, or one each) and the texts scored against them."""
        return _listed(self.text_1), _listed(self.text_2)


def _listed(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


# --- responses ------------------------------------------------------------------------


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="The document's position in the request's `documents`.")
    relevance_score: float = Field(
        description="The cosine similarity of the query's and the document's embeddings (the vectors "
        "`/v1/embeddings` returns), in [-1, 1]: higher is more relevant. Comparable within a request, not a "
        "probability."
    )
    document: RerankDocument | None = Field(None, description="With `return_documents`: the document as sent.")


class RerankUsage(BaseModel):
    total_tokens: int = Field(description="Tokens the model read: the query's and every document's.")


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="Most relevant first; ties in the order sent.")
    usage: RerankUsage


class ScoreData(BaseModel):
    index: int = Field(description="The pair's position: that of its `text_2`.")
    object: Literal["score"] = "score"
    score: float = Field(description="The cosine similarity of the pair's embeddings, in [-1, 1].")


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData] = Field(description="One per pair, in the order of `text_2`.")
    usage: Usage
