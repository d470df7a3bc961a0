"""Relevance on the ``text`` model: ``/v1/rerank`` (documents ranked by relevance to a query, in the shape
Cohere, Jina and vLLM share) and ``/v1/score`` (vLLM's: a score per pair of texts), for a retrieval
pipeline's reranking step.

The ``text`` model is a bi-encoder (a sentence encoder): a pair's score is the cosine similarity of the two
texts' embeddings, the vectors ``/v1/embeddings`` returns. It is computed where the model is served
(``TextEncoder.score``), so these routes stay as they are if a model that reads each pair together (a
cross-encoder) answers there instead. Errors are OpenAI's, as on the other OpenAI-compatible routes.
"""

from fastapi import APIRouter, Request

from api.context import AdmissionDep, DataplaneDep
from api.openai import rerank_schemas as schemas
from api.openai.routes import EMBEDDING_MODEL, ERRORS, _body, _require
from api.openai.schemas import Usage, completion_id, now
from api.policy import RoutePolicy, declare
from api.v1.bodies import read_body

RERANK = "/v1/rerank"
SCORE = "/v1/score"
# Each text of a request is embedded as one of /v1/embeddings': the same model, the same limits.
RELEVANCE = RoutePolicy("openai", (EMBEDDING_MODEL,), ingress=32, proxy=64)

router = APIRouter(tags=["OpenAI-compatible"])


@router.post(
    declare(RERANK, RELEVANCE),
    response_model=schemas.RerankResponse,
    response_model_exclude_none=True,  # no `document` unless asked for, as Cohere answers
    responses=ERRORS,
    openapi_extra=_body(schemas.RerankRequest),
)
async def rerank(request: Request, dataplane: DataplaneDep, admission: AdmissionDep) -> schemas.RerankResponse:
    """The documents ranked by relevance to the query, most relevant first: each result names its document by
    ``index``, scores it (the cosine similarity of the two texts' embeddings) and, with ``return_documents``,
    carries its text. ``top_n`` keeps the first results."""
    with admission.slot(request):
        body, _ = await read_body(request, schemas.RerankRequest)
        _require(dataplane, body.model, EMBEDDING_MODEL, "rerank documents")
        texts = body.texts()
        scored = await dataplane.score([body.query], texts, request.state.deadline)
    ranked = sorted(range(len(texts)), key=lambda i: scored.scores[i], reverse=True)[: body.top_n]  # stable
    return schemas.RerankResponse(
        id=completion_id("rerank"),
        model=EMBEDDING_MODEL,
        results=[
            schemas.RerankResult(
                index=i,
                relevance_score=scored.scores[i],
                document=schemas.RerankDocument(text=texts[i]) if body.return_documents else None,
            )
            for i in ranked
        ],
        usage=schemas.RerankUsage(total_tokens=scored.tokens),
    )


@router.post(
    declare(SCORE, RELEVANCE),
    response_model=schemas.ScoreResponse,
    responses=ERRORS,
    openapi_extra=_body(schemas.ScoreRequest),
)
async def score(request: Request, dataplane: DataplaneDep, admission: AdmissionDep) -> schemas.ScoreResponse:
    """A score per pair of texts, in the order of ``text_2``: one ``text_1`` against each ``text_2``, or a list
    of ``text_1`` paired one to one with ``text_2`` (vLLM's rules: 1:1, 1:N or N:N)."""
    with admission.slot(request):
        body, _ = await read_body(request, schemas.ScoreRequest)
        _require(dataplane, body.model, EMBEDDING_MODEL, "score texts")
        queries, texts = body.pairs()
        scored = await dataplane.score(queries, texts, request.state.deadline)
    return schemas.ScoreResponse(
        id=completion_id("score"),
        created=now(),
        model=EMBEDDING_MODEL,
        data=[schemas.ScoreData(index=i, score=value) for i, value in enumerate(scored.scores)],
        usage=Usage(prompt_tokens=scored.tokens, total_tokens=scored.tokens),
    )


PATHS = tuple(route.path for route in router.routes)
"""The paths this router serves, whose errors are in OpenAI's shape."""
