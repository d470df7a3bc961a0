"""Masking personal data: each kind found and replaced (the real NER model), and where the app applies it."""

import asyncio

import pytest

from api.keys import ApiKey, digest
from deployments.contracts import GenerationChunk, GenerationRequest
from pipelines import usage
from pipelines.dataplane import _masked_answer, _private_request, private
from pipelines.privacy import Masker, Privacy, luhn

SENTENCE = (
    "Please send the invoice to John Smith at john.smith@example.com or call +1 415 555 0132; "
    "he paid with card 4111 1111 1111 1111."
)


@pytest.fixture(scope="module")
def masker() -> Masker:
    return Masker()


def test_each_kind_is_replaced_by_its_placeholder_and_counted(masker):
    text, counts = masker.mask(SENTENCE)
    assert text == ("Please send the invoice to [PERSON] at [EMAIL] or call [PHONE]; he paid with card [CARD].")
    assert counts == {"person": 1, "email": 1, "phone": 1, "card": 1}


def test_long_numbers_that_fail_the_luhn_check_and_texts_without_personal_data_stay(masker):
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    for text in ("Order 4111 1111 1111 1112 shipped to Paris on Monday.", "The weather is nice today."):
        assert masker.mask(text) == (text, {})


def test_national_numbers_of_the_configured_region_and_international_ones_are_phones():
    masker = Masker(("phone",), region="GB")
    text, counts = masker.mask("Ring 020 7946 0958 or +1 415-555-0132 before 5.")
    assert text == "Ring [PHONE] or [PHONE] before 5." and counts == {"phone": 2}


def test_only_the_configured_kinds_are_masked():
    text, counts = Masker(("email",)).mask(SENTENCE)
    assert "[EMAIL]" in text and "John Smith" in text and "4111" in text and counts == {"email": 1}


def test_privacy_modes_choose_whose_texts_are_masked(masker):
    privacy = Privacy()
    privacy._names = masker.names  # loaded once for the module
    masked, plain = ApiKey(id="a", sha256=digest("a"), mask=True), ApiKey(id="b", sha256=digest("b"))
    privacy.configure("keys", ("email", "person"), "US")
    assert (
        privacy.for_key(masked) is privacy.masker and privacy.for_key(plain) is None and privacy.for_key(None) is None
    )
    privacy.configure("all", ("email", "person"), "US")
    assert privacy.for_key(plain) is privacy.masker and privacy.for_key(None) is privacy.masker
    privacy.configure("off", ("email",), "US")
    assert privacy.masker is None and privacy.for_key(masked) is None


async def chunks_of(words: list[str]):
    for n, word in enumerate(words):
        yield GenerationChunk(word, 5, n, "llm", "1", "stop" if n == len(words) - 1 else None)


def test_texts_for_a_model_and_the_answer_are_masked_and_counted_for_the_request(masker):
    async def run():
        used = usage.begin()
        used.masker = masker
        request = await _private_request(GenerationRequest(messages=[{"role": "user", "content": SENTENCE}]))
        # A name and an address split across chunks are held back until the sentence ends, then masked whole.
        words = ["", "Write", " to", " Jane", " Doe", " at", " jane", ".doe@", "example", ".org", ". ", "Thanks", "!"]
        answer = [chunk async for chunk in _masked_answer(chunks_of(words))]
        return request, answer, used

    request, answer, used = asyncio.run(run())
    assert request.messages[0]["content"].startswith("Please send the invoice to [PERSON] at [EMAIL]")
    assert [chunk.text for chunk in answer] == ["", "Write to [PERSON] at [EMAIL]. ", "Thanks!"]
    assert answer[-1].finish_reason == "stop"
    assert used.masked == {"person": 2, "email": 2, "phone": 1, "card": 1}


def test_outside_a_request_or_with_masking_off_texts_pass_unchanged():
    assert asyncio.run(private([SENTENCE])) == [SENTENCE]
