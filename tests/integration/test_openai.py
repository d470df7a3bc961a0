"""The OpenAI-compatible API against the deployed app, through OpenAI's own client (and httpx for the wire)."""

import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from deployments.llm import LanguageConfig, resolve
from tests.serving import openai_refusal, replica_infos

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def llm(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve(LanguageConfig())[0])


def generator_replicas() -> dict[str, dict]:
    return replica_infos("TextGenerator", 2)


def sequences() -> tuple[int, int]:
    """Sequences running and waiting, over every language-model replica."""
    infos = generator_replicas().values()
    return (
        sum(i["details"]["sequences"]["running"] for i in infos),
        sum(i["details"]["sequences"]["waiting"] for i in infos),
    )


def test_chat_answers_the_question_and_stops_at_the_end_of_its_turn(llm, tokenizer):
    answer = llm.chat.completions.create(model="llm", messages=QUESTION, temperature=0)
    choice = answer.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert answer.object == "chat.completion" and answer.model == "llm" and answer.id.startswith("chatcmpl-")
    # Usage counts the tokens the model read and wrote, as its tokenizer makes them.
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert answer.usage.prompt_tokens == len(prompt["input_ids"])
    written = tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]
    assert answer.usage.completion_tokens == len(written)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streamed_deltas_make_the_same_answer_and_usage_comes_when_asked(llm):
    whole = llm.chat.completions.create(model="llm", messages=QUESTION, temperature=0)
    stream = llm.chat.completions.create(
        model="llm", messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_the_same_seed_gives_the_same_sampled_answer(llm):
    def sample(seed: int) -> str:
        answer = llm.chat.completions.create(model="llm", messages=STORY, temperature=0.9, seed=seed, max_tokens=24)
        return answer.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert len({sample(seed) for seed in (1, 2, 3)} | {first}) > 1  # sampling does vary with the seed


def test_stop_strings_end_the_answer_before_them(llm):
    answer = llm.chat.completions.create(model="llm", messages=QUESTION, temperature=0, stop=[" Paris"])
    assert answer.choices[0].message.content == "The capital of France is"
    assert answer.choices[0].finish_reason == "stop"


def test_completions_continue_a_raw_prompt_up_to_max_tokens(llm):
    answer = llm.completions.create(model="llm", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
    assert answer.choices[0].text.strip()
    streamed = llm.completions.create(model="llm", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def test_embeddings_rank_by_meaning_and_equal_the_native_route(llm, client):
    texts = ["a cat on a mat", "a kitten on a rug", "stock markets fell"]
    as_base64 = llm.embeddings.create(model="text", input=texts)  # the client asks for base64 and decodes it
    as_floats = llm.embeddings.create(model="text", input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in as_floats.data])
    assert np.allclose(np.array([d.embedding for d in as_base64.data]), vectors, atol=1e-6)
    cat, kitten, stocks = vectors
    assert kitten @ cat > kitten @ stocks
    native = client.post("/v1/text/embed", json={"texts": texts}).json()["embeddings"]
    assert np.allclose(vectors, np.array(native), atol=1e-6)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens > len(texts)


def test_models_lists_every_model_with_the_language_model(llm):
    models = {m.id: m for m in llm.models.list()}
    assert set(models) == {"vision", "text", "fusion", "ocr", "llm", "explainer", "asr", "tts"}
    assert models["llm"].owned_by == "maas-cluster" and models["llm"].object == "model"
    assert models["llm"].model_extra["name"] == "SmolLM2-135M-Instruct"


def test_concurrent_streams_all_complete_and_share_forward_passes(app_url):
    before = {r: i["details"]["forward_passes"] for r, i in generator_replicas().items()}

    async def one(client: openai.AsyncOpenAI, seed: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model="llm", messages=STORY, temperature=0.7, seed=seed, max_tokens=32, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        reasons, usage = [], None
        async for chunk in stream:
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
            usage = chunk.usage or usage
        return reasons[-1], usage.completion_tokens

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120) as client:
            return await asyncio.gather(*(one(client, seed) for seed in range(8)))

    results = asyncio.run(all_of_them())
    assert all(reason in ("stop", "length") for reason, _ in results)
    tokens = sum(n for _, n in results)
    passes = sum(i["details"]["forward_passes"] - before[r] for r, i in generator_replicas().items())
    # One sequence per pass would need as many passes as tokens; sharing needs far fewer.
    assert tokens / passes > 1.5, (tokens, passes)


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(app_url):
    body = {"model": "llm", "messages": STORY, "temperature": 0.7, "max_tokens": 512, "stream": True}
    with httpx.Client(base_url=app_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break  # hang up: 512 tokens would take tens of seconds more
    deadline = time.monotonic() + 15
    while sequences() != (0, 0):
        assert time.monotonic() < deadline, f"the abandoned generation still holds a slot: {sequences()}"
        time.sleep(0.5)


# --- refusals: each a 4xx in OpenAI's error shape, naming the parameter --------------------------


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "words"),
    [
        ({"model": "gpt-4"}, 404, "model", "no model named 'gpt-4'"),
        ({"model": "vision"}, 400, "model", "does not generate text"),
        ({"messages": []}, 400, "messages", "at least 1 item"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "'system'"),
        (
            {"messages": [{"role": "tool", "content": "hi", "tool_call_id": "x"}]},
            400,
            "messages",
            "tool_call_id must be the id of an earlier assistant tool call",
        ),
        ({"max_tokens": 100_000}, 400, "max_tokens", "over the limit of 512"),
        ({"messages": [{"role": "user", "content": "dragon " * 3000}]}, 400, "messages", "over the limit of 1024"),
        ({"n": 2}, 400, "n", "1"),
        ({"temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"extra_body": {"best_answer": True}}, 400, "best_answer", "Unrecognized request argument supplied"),
    ],
)
def test_bad_chat_requests_are_refused_naming_the_parameter(llm, kwargs, status, param, words):
    request = {"model": "llm", "messages": QUESTION, "max_tokens": 4} | kwargs
    error = openai_refusal(lambda: llm.chat.completions.create(**request))
    assert error.status_code == status
    assert error.body["param"] == param or error.body["param"].startswith(param), error.body
    assert words in error.body["message"]
    assert error.body["type"] == "invalid_request_error"


def test_a_prompt_over_the_context_says_so_in_its_code(llm):
    error = openai_refusal(
        lambda: llm.chat.completions.create(
            model="llm", messages=[{"role": "user", "content": "dragon " * 3000}], max_tokens=4
        )
    )
    assert error.body["code"] == "context_length_exceeded"


def test_wire_errors_are_in_openai_shape_too(client):
    not_json = client.post("/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"})
    assert not_json.status_code == 415 and not_json.json()["error"]["type"] == "invalid_request_error"
    broken = client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "json_invalid"
    embeddings = client.post("/v1/embeddings", json={"model": "text", "input": []})
    assert embeddings.status_code == 400 and embeddings.json()["error"]["param"] == "input"
    assert json.loads(client.get("/v1/nothing").text)["detail"]  # not an OpenAI path: the native shape
