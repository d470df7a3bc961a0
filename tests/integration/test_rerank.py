"""``/v1/rerank`` and ``/v1/score`` against the deployed app, through OpenAI's client (which has no rerank
method: its generic ``post``, as a user of it would call them).

The text model is a bi-encoder (all-MiniLM-L6-v2): a score is the cosine similarity of the two texts'
embeddings, the vectors ``/v1/embeddings`` returns, so the scores are checked against those.
"""

import numpy as np
import openai
import pytest

from deployments.settings import limits
from tests.serving import openai_refusal

QUERY = "how do cats behave?"
DOCUMENTS = [
    "The central bank raised interest rates by a quarter point to curb inflation.",
    "Cats are territorial: they sleep much of the day, groom themselves and hunt at dawn and dusk.",
    "Preheat the oven to 220 degrees and bake the loaf for forty minutes, until it sounds hollow.",
    "The marathon route follows the river through the old town before climbing to the castle.",
    "Python's list comprehensions build a new list from an iterable in a single expression.",
]
CATS = 1
BODIES = {
    "/rerank": {"model": "text", "query": QUERY, "documents": DOCUMENTS},
    "/score": {"model": "text", "text_1": QUERY, "text_2": DOCUMENTS},
}


@pytest.fixture(scope="module")
def text(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client
    client.close()


def rerank(client: openai.OpenAI, **fields) -> dict:
    return client.post("/rerank", cast_to=dict, body=BODIES["/rerank"] | fields)


def score(client: openai.OpenAI, text_1, text_2) -> dict:
    return client.post("/score", cast_to=dict, body=BODIES["/score"] | {"text_1": text_1, "text_2": text_2})


@pytest.fixture(scope="module")
def embedded(text):
    """The query's and the documents' embeddings, from ``/v1/embeddings``."""
    return text.embeddings.create(model="text", input=[QUERY, *DOCUMENTS], encoding_format="float")


@pytest.fixture(scope="module")
def cosines(embedded) -> np.ndarray:
    """The cosine of the query's embedding with each document's."""
    vectors = np.array([d.embedding for d in embedded.data], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors[1:] @ vectors[0]


def test_the_document_about_cats_ranks_first_and_scores_fall(text, embedded):
    body = rerank(text)
    assert body["model"] == "text" and body["id"].startswith("rerank-")
    results = body["results"]
    assert results[0]["index"] == CATS
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[1] + 0.1  # clearly first, not by a hair
    assert all("document" not in r for r in results)  # unless asked for
    assert body["usage"] == {"total_tokens": embedded.usage.total_tokens}  # the same texts read, once each


def test_relevance_scores_are_the_cosines_of_the_embeddings(text, cosines):
    for result in rerank(text)["results"]:
        assert result["relevance_score"] == pytest.approx(cosines[result["index"]], abs=1e-5)


def test_top_n_keeps_the_first_results_and_return_documents_gives_their_text(text):
    full = rerank(text)["results"]
    top = rerank(text, top_n=2, return_documents=True)["results"]
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    assert [r["document"]["text"] for r in top] == [DOCUMENTS[r["index"]] for r in full[:2]]
    objects = rerank(text, documents=[{"text": d} for d in DOCUMENTS], top_n=1)["results"]
    assert [(r["index"], r["relevance_score"]) for r in objects] == [(full[0]["index"], full[0]["relevance_score"])]


def test_score_gives_each_pair_its_cosine_in_the_order_sent(text, cosines):
    one_to_many = score(text, QUERY, DOCUMENTS)
    assert one_to_many["object"] == "list" and one_to_many["model"] == "text"
    assert [d["index"] for d in one_to_many["data"]] == list(range(len(DOCUMENTS)))
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx(cosines.tolist(), abs=1e-5)
    usage = one_to_many["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == rerank(text)["usage"]["total_tokens"]
    pairs = score(text, [QUERY, DOCUMENTS[0]], [DOCUMENTS[CATS], DOCUMENTS[0]])["data"]
    assert pairs[0]["score"] == pytest.approx(cosines[CATS], abs=1e-5)
    assert pairs[1]["score"] == pytest.approx(1.0, abs=1e-5)  # a text with itself


def test_too_many_documents_are_refused_naming_documents(text):
    error = openai_refusal(lambda: rerank(text, documents=["a document"] * (limits().max_texts + 1)))
    assert error.status_code == 400 and error.body["param"] == "documents", error.body
    assert error.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "fields", "status", "param"),
    [
        ("/rerank", {"documents": [DOCUMENTS[0], {"text": "x" * (limits().max_text_chars + 1)}]}, 400,
         "documents.1.text"),
        ("/rerank", {"top_n": 0}, 400, "top_n"),
        ("/rerank", {"model": "rerank-english-v3.0"}, 404, "model"),
        ("/score", {"text_1": [QUERY, QUERY], "text_2": DOCUMENTS}, 400, "text_2"),
        ("/score", {"model": "llm"}, 400, "model"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_naming_the_parameter(text, path, fields, status, param):
    error = openai_refusal(lambda: text.post(path, cast_to=dict, body=BODIES[path] | fields))
    assert (error.status_code, error.body["param"]) == (status, param), error.body
