"""The OpenAI-compatible router over a fake dataplane: request parsing, response and SSE shapes, errors."""

import base64

import numpy as np
import pytest

from tests.unit.fake_dataplane import FakeDataplane, client, events, text_vector

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hello there"}]}


def test_chat_completion_has_openai_shape_and_the_answer(api, dataplane):
    answer = api.post("/v1/chat/completions", json=CHAT | {"temperature": 0, "seed": 7, "stop": "zzz"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion" and body["model"] == "llm" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "you said hello there"}, "finish_reason": "stop",
         "logprobs": None}
    ]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert body["system_fingerprint"] == "llm==3/def"
    (_, request), = [c for c in dataplane.calls if c[0] == "generate"]  # fmt: skip
    assert request.messages == [{"role": "user", "content": "hello there"}]
    assert (request.temperature, request.seed, request.stop, request.max_tokens) == (0, 7, ["zzz"], None)


def test_developer_messages_and_text_parts_become_system_and_plain_text(api, dataplane):
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "again"}]},
    ]
    assert api.post("/v1/chat/completions", json=CHAT | {"messages": messages}).status_code == 200
    request = dataplane.calls[-1][1]
    assert request.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nagain"}]


def test_max_completion_tokens_wins_and_length_is_the_finish_reason(api):
    body = api.post("/v1/chat/completions", json=CHAT | {"max_tokens": 50, "max_completion_tokens": 2}).json()
    assert body["choices"][0]["message"]["content"] == "you said"
    assert body["choices"][0]["finish_reason"] == "length"


def test_stream_sends_role_then_deltas_then_finish_then_usage_then_done(api):
    response = api.post("/v1/chat/completions", json=CHAT | {"stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "you said hello there"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_stream_without_include_usage_sends_no_usage(api):
    chunks = events(api.post("/v1/chat/completions", json=CHAT | {"stream": True}))[:-1]
    assert all("usage" not in c for c in chunks)


def test_completions_take_a_prompt_or_a_list_of_one(api):
    for prompt in ("hello world", ["hello world"]):
        body = api.post("/v1/completions", json={"model": "llm", "prompt": prompt}).json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == "you said hello world"
    streamed = events(api.post("/v1/completions", json={"model": "llm", "prompt": "hi", "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == "you said hi"
    refused = api.post("/v1/completions", json={"model": "llm", "prompt": ["a", "b"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"].startswith("prompt")


def test_embeddings_as_floats_or_base64_of_little_endian_float32(api):
    texts = ["a cat", "the sea"]
    floats = api.post("/v1/embeddings", json={"model": "text", "input": texts}).json()
    assert floats["object"] == "list" and floats["model"] == "text"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert np.allclose(floats["data"][0]["embedding"], text_vector("a cat"))
    assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    packed = api.post("/v1/embeddings", json={"model": "text", "input": "a cat", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, text_vector("a cat"))


def test_models_are_listed_in_openai_shape_with_the_native_details(api):
    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    first = body["data"][0]
    assert (first["id"], first["object"], first["created"], first["owned_by"]) == (
        "vision", "model", 1700000000, "maas-cluster"
    )  # fmt: skip
    assert first["name"] == "vision-model" and first["version"] == "vision-weights==1/abc"


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/chat/completions", CHAT | {"model": "gpt-4"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", CHAT | {"model": "text"}, 400, "model", "invalid_input"),
        ("/v1/embeddings", {"model": "llm", "input": "x"}, 400, "model", "invalid_input"),
        ("/v1/chat/completions", CHAT | {"messages": []}, 400, "messages", "too_short"),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model", "missing"),
        ("/v1/chat/completions", CHAT | {"max_tokens": 101}, 400, "max_tokens", "invalid_input"),
        ("/v1/chat/completions", CHAT | {"max_tokens": 0}, 400, "max_tokens", "greater_than_equal"),
        ("/v1/chat/completions", CHAT | {"n": 3}, 400, "n", "literal_error"),
        ("/v1/chat/completions", CHAT | {"logprobs": True}, 400, "logprobs", "literal_error"),
        ("/v1/chat/completions", CHAT | {"top_p": 0}, 400, "top_p", "greater_than"),
        ("/v1/chat/completions", CHAT | {"stop": ""}, 400, "stop", "string_too_short"),
        ("/v1/chat/completions", CHAT | {"tools": []}, 400, "tools", "extra_forbidden"),
        ("/v1/embeddings", {"model": "text", "input": [1, 2]}, 400, "input", "string_type"),
        ("/v1/embeddings", {"model": "text", "input": "x", "encoding_format": "hex"}, 400, "encoding_format",
         "literal_error"),
    ],
)  # fmt: skip
def test_refusals_are_openai_errors_naming_the_parameter(api, path, body, status, param, code):
    response = api.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"] or "").split(".")[0] == param and error["code"] == code
    assert error["type"] == "invalid_request_error"


def test_unknown_arguments_are_named_as_openai_names_them(api):
    error = api.post("/v1/chat/completions", json=CHAT | {"frobnicate": 1}).json()["error"]
    assert error["message"] == "Unrecognized request argument supplied: frobnicate"


def test_too_much_text_is_refused_before_the_model_sees_it(api, dataplane):
    long = [{"role": "user", "content": "x" * 30_000}] * 3
    response = api.post("/v1/chat/completions", json=CHAT | {"messages": long})
    assert response.status_code == 400 and "at most 65536 in all" in response.json()["error"]["message"]
    assert not [c for c in dataplane.calls if c[0] == "generate"]


def test_overload_and_unavailability_are_openai_errors_with_retry_after():
    overloaded = client(admission={"/v1/chat/completions": 0}).post("/v1/chat/completions", json=CHAT)
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "1"
    assert overloaded.json()["error"]["type"] == "server_error"
    unavailable = client(FakeDataplane(unavailable={"llm"})).post("/v1/chat/completions", json=CHAT)
    assert unavailable.status_code == 503 and unavailable.json()["error"]["code"] == "model_unavailable"


def test_other_v1_routes_keep_their_own_error_shape(api):
    assert "detail" in api.post("/v1/text/embed", json={}).json()


def test_integers_are_json_schemas_integers(api, dataplane):
    """JSON Schema counts 3.0 as an integer, and the OpenAPI document is what clients validate against."""
    response = api.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3.0, "seed": 7.0})
    assert response.status_code == 200, response.text
    request = dataplane.calls[-1][1]
    assert (request.max_tokens, request.seed) == (3, 7)
    assert api.post("/v1/chat/completions", json=CHAT | {"max_tokens": 2.5}).json()["error"]["param"] == "max_tokens"
