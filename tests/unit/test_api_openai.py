"""The OpenAI-compatible router over a fake dataplane: request parsing, response and SSE shapes, errors."""

import base64
import json

import numpy as np
import pytest

from tests.unit.fake_dataplane import FakeDataplane, client, events, text_vector

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hello there"}]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
DEEP = {"type": "object", "properties": {"a": {}}}
for _ in range(20):
    DEEP = {"type": "object", "properties": {"a": DEEP}}
BIG = {"type": "object", "properties": {f"p{i:04d}": {"type": "string", "description": "x" * 100} for i in range(200)}}


def test_chat_completion_has_openai_shape_and_the_answer(api, dataplane):
    answer = api.post("/v1/chat/completions", json=CHAT | {"temperature": 0, "seed": 7, "stop": "zzz"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion" and body["model"] == "llm" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "you said hello there", "tool_calls": None},
         "finish_reason": "stop", "logprobs": None}
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
        ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
         "less_than_equal"),
        ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "top_logprobs", "value_error"),
        ("/v1/chat/completions", CHAT | {"top_p": 0}, 400, "top_p", "greater_than"),
        ("/v1/chat/completions", CHAT | {"stop": ""}, 400, "stop", "string_too_short"),
        ("/v1/chat/completions", CHAT | {"tools": []}, 400, "tools", "too_short"),
        ("/v1/chat/completions", CHAT | {"tools": [WEATHER], "tool_choice": {"type": "function",
         "function": {"name": "get_time"}}}, 400, "tool_choice", "value_error"),
        ("/v1/chat/completions", CHAT | {"tool_choice": "auto"}, 400, "tool_choice", "value_error"),
        ("/v1/chat/completions", CHAT | {"tools": [WEATHER], "response_format": {"type": "json_object"}}, 400,
         "response_format", "value_error"),
        ("/v1/chat/completions", CHAT | {"response_format": {"type": "xml"}}, 400, "response_format",
         "invalid_response_format"),
        ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "deep",
         "schema": DEEP}}}, 400, "response_format", "value_error"),
        ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "big",
         "schema": BIG}}}, 400, "response_format", "value_error"),
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "18C"}]},
         400, "messages", "value_error"),
        ("/v1/completions", {"model": "llm", "prompt": "x", "logprobs": 6}, 400, "logprobs", "less_than_equal"),
        ("/v1/completions", {"model": "llm", "prompt": "x", "guided_regex": "a", "response_format": {"type":
         "json_object"}}, 400, "guided_regex", "value_error"),
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
    assert (error["param"] or "").split(".")[0] == (param or "") and error["code"] == code
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


# --- structured outputs, tools, log probabilities ------------------------------------------------------------

CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'


def _say(text: str, **extra) -> dict:
    return CHAT | {"messages": [{"role": "user", "content": f"say:{text}"}], **extra}


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_a_response_format_becomes_the_grammar_the_answer_is_held_to(api, dataplane):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    answer = api.post("/v1/chat/completions", json=_say('{"city":"Paris"}', response_format=response_format))
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == '{"city":"Paris"}'
    (_, request), = [c for c in dataplane.calls if c[0] == "generate"]  # fmt: skip
    assert request.grammar.kind == "json_schema" and json.loads(request.grammar.source) == schema
    assert request.grammar.field == ("response_format", "json_schema", "schema")
    api.post("/v1/chat/completions", json=CHAT | {"response_format": {"type": "json_object"}})
    api.post("/v1/chat/completions", json=CHAT | {"response_format": {"type": "text"}})
    api.post("/v1/completions", json={"model": "llm", "prompt": "Call", "guided_regex": r"\d{3}"})
    kinds = [c[1].grammar and c[1].grammar.kind for c in dataplane.calls if c[0] == "generate"][1:]
    assert kinds == ["json_object", None, "regex"]
    counted = [c[1:] for c in dataplane.calls if c[0] == "observe_generation"]
    assert counted == [
        ("/v1/chat/completions", "json_schema", "none"),
        ("/v1/chat/completions", "json_object", "none"),
        ("/v1/chat/completions", "text", "none"),
        ("/v1/completions", "regex", "none"),
    ]


def test_a_tool_call_is_answered_as_tool_calls_streamed_or_not(api, dataplane):
    body = _say(CALL, tools=[WEATHER], tool_choice="required")
    answer = api.post("/v1/chat/completions", json=body).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    (_, request), = [c for c in dataplane.calls if c[0] == "generate"]  # fmt: skip
    assert request.grammar.kind == "lark" and "get_weather" in request.grammar.source
    assert ("observe_generation", "/v1/chat/completions", "text", "required") in dataplane.calls
    assert request.tools == [{"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]

    events = _events(api.post("/v1/chat/completions", json=body | {"stream": True}))
    deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
    assert not any(delta.get("content") for delta in deltas)  # the call's text is never sent as content
    parts = [part for delta in deltas for part in delta.get("tool_calls") or ()]
    assert {part["index"] for part in parts} == {0}
    assert parts[0]["function"]["name"] == "get_weather" and parts[0]["id"].startswith("call_")
    assert "".join(part["function"]["arguments"] for part in parts) == '{"city":"Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_with_auto_a_text_answer_streams_as_text(api):
    body = _say("Sunny and warm.", tools=[WEATHER])
    answer = api.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert answer["message"] == {"role": "assistant", "content": "Sunny and warm.", "tool_calls": None}
    assert answer["finish_reason"] == "stop"
    events = _events(api.post("/v1/chat/completions", json=body | {"stream": True}))
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events if event["choices"])
    assert text == "Sunny and warm."


def test_a_tool_result_reaches_the_model_with_the_call_it_answers(api, dataplane):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]  # fmt: skip
    answer = api.post("/v1/chat/completions", json=CHAT | {"messages": messages, "tools": [WEATHER]})
    assert answer.status_code == 200, answer.text
    (_, request), = [c for c in dataplane.calls if c[0] == "generate"]  # fmt: skip
    assert request.messages[1] == {"role": "assistant", "content": None, "tool_calls": messages[1]["tool_calls"]}
    assert request.messages[2] == {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_1"}


def test_tool_choice_none_tells_the_model_of_no_tools_and_holds_it_to_nothing(api, dataplane):
    api.post("/v1/chat/completions", json=CHAT | {"tools": [WEATHER], "tool_choice": "none"})
    (_, request), = [c for c in dataplane.calls if c[0] == "generate"]  # fmt: skip
    assert request.tools is None and request.grammar is None


def test_log_probabilities_in_openai_shapes_streamed_or_not(api):
    body = CHAT | {"logprobs": True, "top_logprobs": 2, "temperature": 0}
    logprobs = api.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]
    assert [item["token"] for item in logprobs["content"]] == ["you", " said", " hello", " there"]
    first = logprobs["content"][0]
    assert first == {
        "token": "you",
        "logprob": -0.25,
        "bytes": [121, 111, 117],
        "top_logprobs": [
            {"token": "you", "logprob": -0.25, "bytes": [121, 111, 117]},
            {"token": "x", "logprob": -2.0, "bytes": [120]},
        ],
    }
    events = _events(api.post("/v1/chat/completions", json=body | {"stream": True}))
    streamed = [item for event in events if event["choices"] and event["choices"][0]["logprobs"]
                for item in event["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert streamed == logprobs["content"]
    plain = api.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
    assert plain["logprobs"] is None

    completion = api.post("/v1/completions", json={"model": "llm", "prompt": "hello there", "logprobs": 1}).json()
    legacy = completion["choices"][0]["logprobs"]
    assert legacy["tokens"] == ["you", " said", " hello", " there"] and legacy["text_offset"] == [0, 3, 8, 14]
    assert legacy["top_logprobs"][0] == {"you": -0.25}
