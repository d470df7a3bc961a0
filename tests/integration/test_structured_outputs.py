"""Structured outputs, tool calls and log probabilities against the deployed app, through OpenAI's own client.

The answers are the shipped SmolLM2-135M's, held to their schemas by constrained decoding: what these tests
check is what a client relies on (every answer parses and validates, a forced call names an allowed function
with valid arguments), not what a 135M model happens to say.
"""

import asyncio
import json
import math
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Landmark(BaseModel):
    name: str = Field(max_length=40)
    year_built: int = Field(ge=0, le=2100)


class City(BaseModel):
    name: str = Field(max_length=40)
    country: Literal["France", "Italy", "Spain", "Germany"]
    population_millions: int = Field(ge=0, le=50)
    landmarks: list[Landmark] = Field(min_length=1, max_length=3)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def llm(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client
    client.close()


def test_parse_returns_the_pydantic_object_for_a_nested_schema(llm):
    answer = llm.chat.completions.parse(
        model="llm",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=0,
        max_tokens=200,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    city = choice.message.parsed
    assert isinstance(city, City) and 1 <= len(city.landmarks) <= 3
    assert City.model_validate_json(choice.message.content) == city


def test_twenty_seeded_samples_at_temperature_one_all_validate(app_url):
    """Concurrent, so constrained requests share the replicas' batches; each has its own seed."""
    schemas = [City, Verdict]

    async def sample(client, seed: int):
        schema = schemas[seed % 2]
        answer = await client.chat.completions.parse(
            model="llm",
            messages=[
                {
                    "role": "user",
                    "content": "Is Paris in France? Answer as JSON."
                    if seed % 2
                    else "Describe a city in Europe as JSON.",
                }
            ],  # fmt: skip
            response_format=schema,
            temperature=1.0,
            seed=seed,
            max_tokens=250,
        )
        return schema, answer.choices[0]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=300, max_retries=0) as c:
            return await asyncio.gather(*(sample(c, seed) for seed in range(20)))

    for schema, choice in asyncio.run(main()):
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, schema)
        jsonschema.validate(json.loads(choice.message.content), schema.model_json_schema())


def test_json_object_answers_parse_and_max_tokens_cuts_with_length(llm):
    answer = llm.chat.completions.create(
        model="llm",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=100,
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}}
    cut = llm.chat.completions.create(
        model="llm", messages=QUESTION, response_format=schema, temperature=0, max_tokens=6
    )
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


def test_constrained_and_free_requests_together_each_get_their_own_answer(app_url, llm):
    alone = llm.chat.completions.create(model="llm", messages=QUESTION, temperature=0).choices[0].message.content

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=300, max_retries=0) as c:
            free = [c.chat.completions.create(model="llm", messages=QUESTION, temperature=0) for _ in range(3)]
            bound = [c.chat.completions.parse(model="llm", messages=QUESTION, response_format=Verdict,
                                              temperature=1.0, seed=s) for s in range(5)]  # fmt: skip
            return await asyncio.gather(*free, *bound)

    answers = asyncio.run(main())
    assert [a.choices[0].message.content for a in answers[:3]] == [alone] * 3 and "Paris" in alone
    for answer in answers[3:]:
        assert isinstance(answer.choices[0].message.parsed, Verdict)


def test_a_named_tool_choice_calls_that_function_with_valid_arguments(llm):
    answer = llm.chat.completions.create(
        model="llm",
        messages=WEATHER_QUESTION,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_required_calls_one_of_the_tools_and_the_follow_up_turn_uses_its_result(llm):
    first = llm.chat.completions.create(
        model="llm", messages=WEATHER_QUESTION, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, temperature=0,
    )  # fmt: skip
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    tool = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    result = '{"temperature": 18, "sky": "sunny"}' if tool is WEATHER else '{"time": "14:05"}'
    follow_up = llm.chat.completions.create(
        model="llm",
        messages=[
            *WEATHER_QUESTION,
            first.choices[0].message,
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ],
        tools=[WEATHER, TIME],
        temperature=0,
    )
    choice = follow_up.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content.strip()


def test_streamed_tool_call_deltas_join_to_the_unstreamed_call(llm):
    request = {"model": "llm", "messages": WEATHER_QUESTION, "tools": [WEATHER], "tool_choice": "required",
               "temperature": 0}  # fmt: skip
    whole = llm.chat.completions.create(**request).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in llm.chat.completions.create(**request, stream=True):
        if not chunk.choices:
            continue
        assert not chunk.choices[0].delta.content
        for part in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(part.index, {"name": "", "arguments": ""})
            call["name"] += part.function.name or "" if part.function else ""
            call["arguments"] += part.function.arguments or "" if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (call.function.name, call.function.arguments) for call in whole
    ]


def test_top_logprobs_are_the_chosen_tokens_distribution_streamed_or_not(llm):
    answer = llm.chat.completions.create(model="llm", messages=QUESTION, temperature=0, logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content
    assert "".join(item.token for item in content) == answer.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 5
        probabilities = [math.exp(top.logprob) for top in item.top_logprobs]
        assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        assert max(item.top_logprobs, key=lambda top: top.logprob).token == item.token  # greedy: the most likely
    streamed = [
        item
        for chunk in llm.chat.completions.create(
            model="llm", messages=QUESTION, temperature=0, logprobs=True, top_logprobs=5, stream=True
        )
        if chunk.choices and chunk.choices[0].logprobs
        for item in chunk.choices[0].logprobs.content
    ]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]


def test_completions_take_logprobs_and_a_guided_regex(llm):
    completion = llm.completions.create(
        model="llm", prompt="The phone number is", max_tokens=12, temperature=0, logprobs=2,
        extra_body={"guided_regex": r" \d{3}-\d{4}"},
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and len(choice.text) == 9 and choice.text[4] == "-"
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.top_logprobs[0]) <= 2


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "(?<=a)b"}}}}, "response_format.json_schema.schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "objectx"}}}]}, "tools"),
    ],
)  # fmt: skip
def test_what_cannot_be_done_is_a_400_naming_the_parameter(app_url, extra, param):
    response = httpx.post(f"{app_url}/v1/chat/completions", json={"model": "llm", "messages": QUESTION, **extra},
                          timeout=60)  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "strin" not in error["message"] and "(?<=a)b" not in error["message"]
