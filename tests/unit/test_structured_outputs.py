"""Constrained decoding, tool calls and log probabilities in the language-model deployment, without Ray.

The deployment is built from its class and configured as Serve would (``reconfigure``); its continuous
batcher runs the real SmolLM2 model on this process's CPU, so these answers are the model's own.
"""

import asyncio
import json
import math

import jsonschema
import pytest

from deployments import tools
from deployments.contracts import GenerationRequest, Grammar
from deployments.errors import InvalidInput

SETTINGS = {"max_prompt_tokens": 1024, "max_tokens": 192, "default_max_tokens": 64, "max_sequences": 8}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
DESCRIBE = [{"role": "user", "content": "Describe a person who lives in Paris, as JSON."}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {
    "name": "get_time",
    "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


async def _answer(generator, **request):
    chunks = [chunk async for chunk in generator.generate(GenerationRequest(**request))]
    logprobs = [item for chunk in chunks for item in chunk.logprobs or ()]
    return "".join(chunk.text for chunk in chunks), chunks[-1].finish_reason, logprobs


def answers(loop, generator, *requests: dict) -> list:
    """The requests' answers, generated together (their sequences share forward passes)."""

    async def together():
        return await asyncio.gather(*(_answer(generator, **request) for request in requests))

    return loop.run_until_complete(together())


def schema_grammar(schema: dict) -> Grammar:
    return Grammar("json_schema", json.dumps(schema), ("response_format", "json_schema", "schema"))


def test_constrained_and_free_answers_share_the_batch_and_neither_changes_the_other(loop, generator):
    (alone, _, _), = answers(loop, generator, {"messages": QUESTION, "temperature": 0})  # fmt: skip
    # PERSON's strings are bounded, so even one character a token its answers end within 192 tokens
    constrained = {"messages": DESCRIBE, "grammar": schema_grammar(PERSON), "temperature": 1.0, "max_tokens": 192}
    together = answers(
        loop,
        generator,
        {"messages": QUESTION, "temperature": 0},
        *({**constrained, "seed": seed} for seed in range(5)),
        {
            "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
            "grammar": Grammar("json_object"),
            "temperature": 0,
            "max_tokens": 96,
        },
    )
    assert together[0][0] == alone and "Paris" in alone
    for text, reason, _ in together[1:6]:
        assert reason == "stop", (text, reason, len(text))
        jsonschema.validate(json.loads(text), PERSON)
    text, reason, _ = together[6]
    assert reason == "stop" and isinstance(json.loads(text), dict), text


def test_a_seed_gives_the_same_constrained_answer_again(loop, generator):
    request = {"messages": DESCRIBE, "grammar": schema_grammar(PERSON), "temperature": 1.0, "seed": 11}
    first, second = answers(loop, generator, request, request)
    assert first[0] == second[0]


def test_a_schema_the_engine_refuses_is_an_error_naming_the_field_before_any_token(loop, generator):
    secret = "strin-do-not-echo"
    bad = {"type": "object", "properties": {"a": {"type": secret}}}
    with pytest.raises(InvalidInput) as refused:
        answers(loop, generator, {"messages": QUESTION, "grammar": schema_grammar(bad)})
    assert refused.value.field == ("response_format", "json_schema", "schema")
    assert "type" in refused.value.message and secret not in refused.value.message
    unsatisfiable = {"type": "array", "minItems": 5, "maxItems": 2}
    with pytest.raises(InvalidInput, match="no value can satisfy it"):
        answers(loop, generator, {"messages": QUESTION, "grammar": schema_grammar(unsatisfiable)})


def test_a_grammar_is_built_once_and_then_copied_from_the_cache(loop, generator):
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    hits, misses = generator.grammars.hits, generator.grammars.misses
    for _ in range(2):
        answers(loop, generator, {"messages": QUESTION, "grammar": schema_grammar(schema), "max_tokens": 8})
    assert generator.grammars.misses == misses + 1 and generator.grammars.hits == hits + 1


def test_an_answer_cut_short_by_max_tokens_ends_with_length(loop, generator):
    (text, reason, _), = answers(loop, generator, {"messages": DESCRIBE, "grammar": schema_grammar(PERSON),
                                                   "temperature": 0, "max_tokens": 5})  # fmt: skip
    assert reason == "length" and text.startswith("{")


def test_a_regex_holds_a_whole_completion(loop, generator):
    (text, reason, _), = answers(loop, generator, {"prompt": "The phone number is", "temperature": 0,
                                                   "grammar": Grammar("regex", r"\d{3}-\d{4}")})  # fmt: skip
    assert reason == "stop" and len(text) == 8 and text[3] == "-" and text.replace("-", "").isdigit()


def test_log_probabilities_come_from_the_distribution_each_token_was_chosen_from(loop, generator):
    ((text, _, logprobs),) = answers(loop, generator, {"messages": QUESTION, "temperature": 0, "logprobs": 5})
    assert len(logprobs) > 3
    assert "".join(item.token for item in logprobs) == text
    for item in logprobs:
        assert len(item.top) == 5
        probabilities = [math.exp(value) for _, _, value in item.top]
        assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        assert item.top[0][0] == item.token and item.top[0][2] == pytest.approx(item.logprob)  # greedy: the best
        assert bytes(item.bytes).decode() == item.token


def test_a_constrained_answer_reports_the_masked_distribution(loop, generator):
    (text, _, logprobs), = answers(loop, generator, {"messages": QUESTION, "temperature": 0, "logprobs": 20,
                                                     "grammar": Grammar("regex", "(yes|no)")})  # fmt: skip
    assert text in ("yes", "no")
    first = logprobs[0]  # only the tokens that can start "yes" or "no" have any probability
    assert all("yes".startswith(token) or "no".startswith(token) for token, _, _ in first.top), first.top
    assert sum(math.exp(value) for _, _, value in first.top) == pytest.approx(1.0, abs=1e-4)


def test_a_forced_call_names_an_allowed_function_with_valid_arguments(loop, generator):
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    required = Grammar("lark", tools.grammar([WEATHER, TIME], "required", False), ("tools",))
    named = Grammar("lark", tools.grammar([TIME], "named", False), ("tools",))
    results = answers(
        loop,
        generator,
        {"messages": ask, "tools": [WEATHER, TIME], "grammar": required, "temperature": 0},
        *(
            {"messages": ask, "tools": [WEATHER, TIME], "grammar": named, "temperature": 1.0, "seed": s}
            for s in range(3)
        ),
    )
    for index, (text, reason, _) in enumerate(results):
        content, calls = tools.parse(text)
        assert reason == "stop" and content is None and len(calls) == 1, text
        function = calls[0]["function"]
        assert function["name"] == ("get_time" if index else function["name"])
        assert function["name"] in ("get_weather", "get_time")
        jsonschema.validate(json.loads(function["arguments"]), WEATHER["parameters"])


def test_a_tool_result_is_used_in_the_next_answer(loop, generator):
    chat = [
        {"role": "user", "content": "What is the weather like in Paris today?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "sunny"}'},
    ]  # fmt: skip
    auto = Grammar("lark", tools.grammar([WEATHER], "auto", True), ("tools",))
    (text, reason, _), = answers(loop, generator, {"messages": chat, "tools": [WEATHER], "grammar": auto,
                                                   "temperature": 0})  # fmt: skip
    content, calls = tools.parse(text)
    assert reason == "stop" and not calls and "sunny" in content.lower()


def test_a_vanishing_temperature_is_greedy_with_finite_log_probabilities(loop, generator):
    """Found by fuzzing: logits divided by a temperature of 1e-233 are infinite, and the sample was garbage."""
    greedy, tiny = answers(
        loop,
        generator,
        {"messages": QUESTION, "temperature": 0, "logprobs": 1},
        {"messages": QUESTION, "temperature": 1e-233, "top_p": 0.1, "logprobs": 1, "seed": 3},
    )
    assert tiny[0] == greedy[0] and "Paris" in tiny[0]
    assert all(math.isfinite(item.logprob) for item in tiny[2])
