"""``/v1/rerank`` and ``/v1/score`` over a fake dataplane (ranking, ``top_n``, ``return_documents``, pairing,
limits and errors); the dataplane's masking of the texts; and ``TextEncoder.score`` on the shipped
all-MiniLM-L6-v2 (the cosine of ``embed``'s vectors)."""

import asyncio
from collections import Counter

import numpy as np
import pytest

from api.access import Guard
from api.keys import ApiKey, digest
from api.policy import ROUTES
from deployments.contracts import TextScores
from deployments.errors import InvalidInput
from deployments.settings import limits
from deployments.text import TextEncoder
from pipelines import usage
from pipelines.dataplane import Dataplane
from pipelines.registry import ModelRegistry
from tests.unit.fake_dataplane import FakeDataplane, client, text_vector

QUERY = "a cat"
DOCUMENTS = ["the sea and the sky", "a cat", "aaaaaaaa", "a bat"]


def rerank(api, **fields):
    return api.post("/v1/rerank", json={"model": "text", "query": QUERY, "documents": DOCUMENTS} | fields)


def cosine(a: str, b: str) -> float:
    return float(text_vector(a).astype(np.float64) @ text_vector(b).astype(np.float64))


def test_documents_are_ranked_by_the_cosine_of_their_embeddings_most_relevant_first(api):
    answer = rerank(api)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"].startswith("rerank-") and body["model"] == "text"
    expected = sorted(range(len(DOCUMENTS)), key=lambda i: -cosine(QUERY, DOCUMENTS[i]))
    assert [result["index"] for result in body["results"]] == expected
    for result in body["results"]:
        assert set(result) == {"index", "relevance_score"}  # no document unless asked for, as Cohere answers
        assert result["relevance_score"] == pytest.approx(cosine(QUERY, DOCUMENTS[result["index"]]), abs=1e-6)
    # The scores are those of the vectors /v1/embeddings returns.
    vectors = [d["embedding"] for d in api.post("/v1/embeddings", json={"model": "text", "input": [QUERY, *DOCUMENTS]})
               .json()["data"]]  # fmt: skip
    assert body["results"][0]["relevance_score"] == pytest.approx(float(np.dot(vectors[0], vectors[2])), abs=1e-6)
    assert body["usage"] == {"total_tokens": 2 + 5 + 2 + 1 + 2}  # the query's and every document's


def test_top_n_keeps_the_most_relevant_and_more_than_were_sent_keeps_all(api):
    everything = [result["index"] for result in rerank(api).json()["results"]]
    assert [result["index"] for result in rerank(api, top_n=2).json()["results"]] == everything[:2]
    assert [result["index"] for result in rerank(api, top_n=2.0).json()["results"]] == everything[:2]
    assert [result["index"] for result in rerank(api, top_n=99).json()["results"]] == everything


def test_return_documents_gives_each_result_its_text_as_sent_strings_or_objects(api, dataplane):
    documents = [{"text": "the sea and the sky"}, "a cat", {"text": "a bat"}]
    body = rerank(api, documents=documents, return_documents=True, top_n=2).json()
    assert [(r["index"], r["document"]) for r in body["results"]] == [(1, {"text": "a cat"}), (2, {"text": "a bat"})]
    assert dataplane.calls[-1] == ("score", [QUERY], ["the sea and the sky", "a cat", "a bat"])
    assert all("document" not in r for r in rerank(api, return_documents=False).json()["results"])


def test_equal_scores_keep_the_order_sent(api):
    body = rerank(api, documents=["a dog", "a cow", "a pig", "a fox"]).json()  # one fake vector for all
    assert [result["index"] for result in body["results"]] == [0, 1, 2, 3]


def test_score_pairs_one_text_1_with_each_text_2_or_lists_one_to_one(api):
    texts = ["a bat", "the sea"]
    one = api.post("/v1/score", json={"model": "text", "text_1": QUERY, "text_2": texts})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == "text" and body["id"].startswith("score-")
    assert isinstance(body["created"], int)
    assert [(d["index"], d["object"]) for d in body["data"]] == [(0, "score"), (1, "score")]
    assert [d["score"] for d in body["data"]] == pytest.approx([cosine(QUERY, t) for t in texts], abs=1e-6)
    assert body["usage"] == {"prompt_tokens": 2 + 2 + 2, "completion_tokens": 0, "total_tokens": 6}
    listed = api.post("/v1/score", json={"model": "text", "text_1": [QUERY], "text_2": texts}).json()
    assert [d["score"] for d in listed["data"]] == [d["score"] for d in body["data"]]  # a list of one: 1:N
    queries = ["the sea", "a cat"]
    pairs = api.post("/v1/score", json={"model": "text", "text_1": queries, "text_2": texts}).json()
    assert [d["score"] for d in pairs["data"]] == pytest.approx([cosine(q, t) for q, t in zip(queries, texts)])
    single = api.post("/v1/score", json={"model": "text", "text_1": "a cat", "text_2": "a cat"}).json()
    assert [d["score"] for d in single["data"]] == pytest.approx([1.0])


MAX_TEXTS, MAX_CHARS = limits().max_texts, limits().max_text_chars
LONG = "x" * (MAX_CHARS + 1)
RERANK = {"model": "text", "query": QUERY, "documents": DOCUMENTS}
SCORE = {"model": "text", "text_1": QUERY, "text_2": DOCUMENTS}


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/rerank", RERANK | {"documents": ["d"] * (MAX_TEXTS + 1)}, 400, "documents", "too_long"),
        ("/v1/rerank", RERANK | {"documents": []}, 400, "documents", "too_short"),
        ("/v1/rerank", RERANK | {"documents": [*DOCUMENTS[:3], LONG]}, 400, "documents.3", "string_too_long"),
        ("/v1/rerank", RERANK | {"documents": [*DOCUMENTS[:3], {"text": LONG}]}, 400, "documents.3.text",
         "string_too_long"),
        ("/v1/rerank", RERANK | {"documents": ["a", ""]}, 400, "documents.1", "string_too_short"),
        ("/v1/rerank", RERANK | {"documents": ["a", 7]}, 400, "documents.1", "invalid_document"),
        ("/v1/rerank", RERANK | {"documents": [{"txt": "a"}]}, 400, "documents.0.text", "missing"),
        ("/v1/rerank", RERANK | {"query": ""}, 400, "query", "string_too_short"),
        ("/v1/rerank", RERANK | {"query": LONG}, 400, "query", "string_too_long"),
        ("/v1/rerank", {k: v for k, v in RERANK.items() if k != "query"}, 400, "query", "missing"),
        ("/v1/rerank", RERANK | {"top_n": 0}, 400, "top_n", "greater_than_equal"),
        ("/v1/rerank", RERANK | {"top_n": 1.5}, 400, "top_n", "int_type"),
        ("/v1/rerank", RERANK | {"top_n": "2"}, 400, "top_n", "int_type"),
        ("/v1/rerank", RERANK | {"return_documents": "yes"}, 400, "return_documents", "bool_type"),
        ("/v1/rerank", RERANK | {"max_tokens_per_doc": 512}, 400, "max_tokens_per_doc", "extra_forbidden"),
        ("/v1/rerank", RERANK | {"model": "rerank-v3.5"}, 404, "model", "model_not_found"),
        ("/v1/rerank", RERANK | {"model": "llm"}, 400, "model", "invalid_input"),
        ("/v1/score", SCORE | {"text_1": ["a", "b"]}, 400, "text_2", "value_error"),
        ("/v1/score", SCORE | {"text_1": ["a", "b"], "text_2": "c"}, 400, "text_2", "value_error"),
        ("/v1/score", SCORE | {"text_2": ["d"] * (MAX_TEXTS + 1)}, 400, "text_2", "too_long"),
        ("/v1/score", SCORE | {"text_2": []}, 400, "text_2", "too_short"),
        ("/v1/score", SCORE | {"text_2": ["a", LONG]}, 400, "text_2.1", "string_too_long"),
        ("/v1/score", SCORE | {"text_1": 5}, 400, "text_1", "invalid_texts"),
        ("/v1/score", SCORE | {"text_1": ""}, 400, "text_1", "string_too_short"),
        ("/v1/score", SCORE | {"model": "gpt-4"}, 404, "model", "model_not_found"),
        ("/v1/score", SCORE | {"model": "vision"}, 400, "model", "invalid_input"),
    ],
)  # fmt: skip
def test_refusals_are_openai_errors_naming_the_parameter_before_any_model_work(
    api, dataplane, path, body, status, param, code
):
    response = api.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert not [call for call in dataplane.calls if call[0] == "score"]


def test_an_unavailable_text_model_is_a_503_in_openai_shape():
    response = client(FakeDataplane(unavailable={"text"})).post("/v1/rerank", json=RERANK)
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert response.json()["error"]["type"] == "server_error"


def test_the_routes_need_a_key_for_the_openai_family_and_the_text_model(dataplane):
    assert ROUTES["/v1/rerank"] == ROUTES["/v1/score"] == ROUTES["/v1/embeddings"]
    guard = Guard()
    guard.configure(True, [
        ApiKey(id="chat", sha256=digest("maas_chat"), routes=["openai"], models=["llm"]),
        ApiKey(id="search", sha256=digest("maas_search"), routes=["openai"], models=["text"]),
    ], None)  # fmt: skip
    api = client(dataplane, guard=guard)
    for path, body in (("/v1/rerank", RERANK), ("/v1/score", SCORE)):
        assert api.post(path, json=body).status_code == 401
        refused = api.post(path, json=body, headers={"Authorization": "Bearer maas_chat"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope", refused.text
        assert api.post(path, json=body, headers={"Authorization": "Bearer maas_search"}).status_code == 200


def test_the_openapi_document_describes_both_routes(api):
    paths = api.get("/openapi.json").json()["paths"]
    rerank_body = paths["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert rerank_body["properties"]["documents"]["maxItems"] == MAX_TEXTS
    assert set(rerank_body["required"]) == {"model", "query", "documents"}
    score_body = paths["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(score_body["required"]) == {"model", "text_1", "text_2"}


# --- the dataplane: the texts are masked before the model reads them ----------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

        async def remote(queries, documents):
            self.calls.append((queries, documents))
            return TextScores([0.5] * len(documents), "text-model", "v", 3)

        self.score = type("Method", (), {"remote": staticmethod(remote)})


class NameMasker:
    def mask_all(self, texts: list[str]) -> tuple[list[str], Counter]:
        return [t.replace("Alice", "[name]") for t in texts], Counter(name=sum(t.count("Alice") for t in texts))


def test_the_dataplane_masks_the_query_and_the_documents_as_embed_does():
    recorder = Recorder()
    dataplane = Dataplane(ModelRegistry({"text": recorder}))

    async def masked() -> tuple[TextScores, usage.Usage]:
        used = usage.begin()
        used.masker = NameMasker()
        return await dataplane.score(["Alice's cat"], ["a cat", "Alice"], _Deadline()), used

    scores, used = asyncio.run(masked())
    assert recorder.calls == [(["[name]'s cat"], ["a cat", "[name]"])]
    assert scores.scores == [0.5, 0.5] and used.masked == Counter(name=2)


class _Deadline:
    def remaining(self) -> float:
        return 5.0


# --- the deployment: a bi-encoder's scores are the cosines of its embeddings ----------------------------------------


@pytest.fixture(scope="module")
def encoder(loop):
    """The TextEncoder serving the shipped model; its texts are embedded one batch each (Serve's batching
    needs a replica)."""
    replica = TextEncoder.func_or_class()
    loop.run_until_complete(replica.reconfigure({}))
    unbatched = TextEncoder.func_or_class._embed_batch.__wrapped__

    async def one(text: str):
        (row,) = await unbatched(replica, [text])
        return row

    replica._embed_batch = one
    return replica


CATS = "how do cats behave?"
PASSAGES = [
    "The central bank raised interest rates by a quarter point to curb inflation.",
    "Cats are territorial and spend much of the day sleeping; they groom themselves and hunt at dawn and dusk.",
    "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
    "The marathon route follows the river through the old town.",
]


def test_the_encoder_scores_by_the_cosine_of_the_vectors_embed_returns(loop, encoder):
    scored = loop.run_until_complete(encoder.score([CATS], PASSAGES))
    embedded = loop.run_until_complete(encoder.embed([CATS, *PASSAGES]))
    vectors = embedded.vectors.astype(np.float64)
    assert scored.scores == pytest.approx((vectors[1:] @ vectors[0]).tolist(), abs=1e-6)
    assert int(np.argmax(scored.scores)) == 1  # the passage about cats
    assert scored.tokens == embedded.tokens and (scored.model, scored.version) == (embedded.model, embedded.version)
    pairs = loop.run_until_complete(encoder.score(PASSAGES[:2], PASSAGES[:2]))
    assert pairs.scores == pytest.approx([1.0, 1.0], abs=1e-5)
    with pytest.raises(InvalidInput, match="1:1, 1:N or N:N"):
        loop.run_until_complete(encoder.score(PASSAGES[:2], PASSAGES))
