"""The language-model deployment's class without Ray: settings, limits, streamed chunks, stop strings, seeds.

The deployment is built from its class (``TextGenerator.func_or_class``) and configured as Serve would,
through ``reconfigure``; its batcher runs the real model on this process's CPU.
"""

import pytest
from pydantic import ValidationError

from deployments.contracts import GenerationRequest
from deployments.errors import InvalidInput
from deployments.language import GenerationSettings, PromptTooLong

SETTINGS = {"max_prompt_tokens": 64, "max_tokens": 32, "default_max_tokens": 8, "max_sequences": 4}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chunks(loop, generator, **request) -> list:
    async def collect():
        return [chunk async for chunk in generator.generate(GenerationRequest(**request))]

    return loop.run_until_complete(collect())


def test_an_answer_streams_after_an_empty_first_chunk_and_ends_with_its_reason(loop, generator):
    answer = chunks(loop, generator, messages=QUESTION, temperature=0, max_tokens=20)
    assert answer[0].text == "" and answer[0].completion_tokens == 0 and answer[0].prompt_tokens > 0
    assert "Paris" in "".join(c.text for c in answer)
    assert answer[-1].finish_reason == "stop" and all(c.finish_reason is None for c in answer[:-1])
    assert answer[-1].completion_tokens == 7 and answer[-1].model == "SmolLM2-135M-Instruct"


def test_the_default_max_tokens_applies_when_none_is_asked(loop, generator):
    answer = chunks(loop, generator, prompt="Once upon a time", temperature=0)
    assert (answer[-1].completion_tokens, answer[-1].finish_reason) == (8, "length")


def test_a_stop_string_ends_the_answer_before_it(loop, generator):
    answer = chunks(loop, generator, messages=QUESTION, temperature=0, stop=[" Paris"])
    assert "".join(c.text for c in answer) == "The capital of France is"
    assert answer[-1].finish_reason == "stop"


def test_a_seed_gives_the_same_sample_and_others_differ(loop, generator):
    def sample(seed):
        answer = chunks(loop, generator, prompt="My favourite animal is", temperature=1.0, seed=seed, max_tokens=12)
        return "".join(c.text for c in answer)

    assert sample(42) == sample(42)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_limits_are_refused_before_any_generation_naming_the_field(loop, generator):
    with pytest.raises(InvalidInput, match="33 is over the limit of 32") as too_many:
        chunks(loop, generator, messages=QUESTION, max_tokens=33)
    assert too_many.value.field == "max_tokens"
    with pytest.raises(PromptTooLong, match="over the limit of 64") as too_long:
        chunks(loop, generator, messages=[{"role": "user", "content": "word " * 100}])
    assert too_long.value.field == "messages" and too_long.value.error_type == "context_length_exceeded"
    assert generator.batcher.sequences() == (0, 0)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValidationError, match="default_max_tokens"):
        GenerationSettings(max_tokens=16, default_max_tokens=32)
    with pytest.raises(ValidationError, match="extra"):
        GenerationSettings(max_token=16)


def test_a_bad_update_keeps_the_current_limits(loop, generator):
    loop.run_until_complete(generator.reconfigure({**SETTINGS, "max_prompt_tokens": 9000}))  # over the context
    assert generator.settings.max_prompt_tokens == 64
    assert "context" in generator.update_error
    loop.run_until_complete(generator.reconfigure(SETTINGS))
    assert generator.update_error is None
