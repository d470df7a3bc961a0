"""What the language model is told about an image: the evidence's bounds, its exact wording, and the prompts."""

import pytest

from deployments.contracts import OcrLine
from pipelines import grounding
from pipelines.grounding import CHAT_SYSTEM, DESCRIBE_SYSTEM, ImagePart, chat_messages, describe_messages, gather


def lines(*texts: str) -> list[OcrLine]:
    return [OcrLine(text, 0.9, [(0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0)]) for text in texts]


CAT = gather([("Egyptian cat", 0.72), ("tiger cat", 0.15), ("tabby", 0.05)], lines("OPEN SESAME"))
DARK = gather([("pizza", 0.93)], [])


# --- gather -------------------------------------------------------------------------


def test_at_most_three_classes_are_kept_most_likely_first():
    classes = [("a", 0.3), ("b", 0.25), ("c", 0.2), ("d", 0.15), ("e", 0.1)]
    evidence = gather(classes, [])
    assert grounding.MAX_CLASSES == 3
    assert evidence.classes == [("a", 0.3), ("b", 0.25), ("c", 0.2)]


def test_classes_below_ten_percent_are_left_out_and_ten_percent_is_kept():
    evidence = gather([("sure", 0.8), ("edge", 0.1), ("unsure", 0.0999)], [])
    assert grounding.MIN_CLASS_PROBABILITY == 0.1
    assert evidence.classes == [("sure", 0.8), ("edge", 0.1)]


def test_no_class_is_kept_when_the_classifier_is_unsure_of_all():
    assert gather([("a", 0.09), ("b", 0.05)], []).classes == []


def test_ocr_lines_are_joined_with_slashes_and_whitespace_inside_a_line_is_collapsed():
    evidence = gather([], lines("  OPEN \t  SESAME ", "Soup of\nthe   day"))
    assert evidence.text == "OPEN SESAME / Soup of the day"
    assert not evidence.text_truncated
    assert [line.text for line in evidence.lines] == ["  OPEN \t  SESAME ", "Soup of\nthe   day"]  # all, as read


def test_text_of_exactly_the_limit_is_kept_whole():
    text = "x" * grounding.MAX_TEXT_CHARS
    evidence = gather([], lines(text))
    assert evidence.text == text and not evidence.text_truncated


def test_longer_text_is_cut_to_the_limit_and_marked_truncated():
    read = lines(*(f"line number {i} of a long page" for i in range(40)))
    evidence = gather([], read)
    assert evidence.text_truncated
    assert grounding.MAX_TEXT_CHARS - 40 <= len(evidence.text) <= grounding.MAX_TEXT_CHARS == 400
    assert evidence.text.startswith("line number 0 of a long page / line number 1 of a long page / ")
    assert len(evidence.lines) == 40  # the lines themselves are all returned


def test_no_text_gives_an_empty_untruncated_text():
    assert (DARK.text, DARK.text_truncated, DARK.lines) == ("", False, [])


# --- render -------------------------------------------------------------------------


def test_evidence_renders_classes_with_percentages_and_the_quoted_text():
    assert CAT.render() == 'Objects recognised: Egyptian cat (72%), tiger cat (15%).\nText read: "OPEN SESAME".'


def test_evidence_without_text_says_so():
    assert DARK.render() == "Objects recognised: pizza (93%).\nText read: no text."


def test_evidence_without_a_likely_class_says_nothing_was_recognised_with_confidence():
    evidence = gather([("a", 0.05)], lines("EXIT"))
    assert evidence.render() == 'Objects recognised: nothing with confidence.\nText read: "EXIT".'


def test_several_lines_render_in_reading_order():
    evidence = gather([("menu", 0.71)], lines("DAILY SPECIALS", "Soup of the day"))
    assert evidence.render() == 'Objects recognised: menu (71%).\nText read: "DAILY SPECIALS / Soup of the day".'


# --- describe -----------------------------------------------------------------------


def _example_prompts(messages: list[dict]) -> list[str]:
    """The user messages of the worked examples (between the system message and the last message)."""
    return [m["content"] for m in messages[1:-1] if m["role"] == "user"]


def test_describe_asks_about_the_evidence_in_its_last_message_after_worked_examples():
    messages = describe_messages(CAT)
    assert messages[0] == {"role": "system", "content": DESCRIBE_SYSTEM}
    assert messages[-1]["role"] == "user"
    assert messages[-1]["content"].startswith(CAT.render())
    assert messages[-1]["content"].endswith(grounding.DESCRIBE_ASK)
    examples = messages[1:-1]
    assert examples and len(examples) % 2 == 0
    assert [m["role"] for m in examples] == ["user", "assistant"] * (len(examples) // 2)
    assert all(m["content"].strip() for m in examples)


def test_describe_shows_examples_with_text_when_ocr_found_text():
    prompts = _example_prompts(describe_messages(CAT))
    assert prompts and all('Text read: "' in p for p in prompts)
    assert not any("Text read: no text." in p for p in prompts)


def test_describe_shows_examples_without_text_when_ocr_found_none():
    prompts = _example_prompts(describe_messages(DARK))
    assert prompts and all("Text read: no text." in p for p in prompts)


def test_the_images_own_evidence_is_not_among_the_examples():
    messages = describe_messages(CAT)
    assert not any(CAT.render() in m["content"] for m in messages[:-1])


# --- chat ---------------------------------------------------------------------------


def test_each_image_part_becomes_its_number_and_evidence_in_place():
    chat = [{"role": "user", "content": ["Compare", ImagePart(1), "with", ImagePart(0), "please."]}]
    grounded = chat_messages(chat, [CAT, DARK])
    assert len(grounded) == 2
    user = grounded[1]
    assert user["role"] == "user"
    content = user["content"]
    order = ["Compare", "[Image 2]\n" + DARK.render(), "with", "[Image 1]\n" + CAT.render(), "please."]
    positions = [content.find(piece) for piece in order]
    assert -1 not in positions, content
    assert positions == sorted(positions)
    assert "ImagePart" not in content


def test_text_only_messages_pass_through_unchanged_after_the_grounding_system_message():
    chat = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": ["look:", ImagePart(0)]},
    ]
    grounded = chat_messages(chat, [DARK])
    assert grounded[0] == {"role": "system", "content": CHAT_SYSTEM}
    assert grounded[1:3] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert grounded[3]["content"].startswith("look:")
    assert grounded[3]["content"].endswith("[Image 1]\n" + DARK.render())


def test_a_callers_leading_system_message_is_merged_into_one_with_ours_first():
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": [ImagePart(0), "Quoi?"]}]
    grounded = chat_messages(chat, [CAT])
    assert [m["role"] for m in grounded] == ["system", "user"]
    system = grounded[0]["content"]
    assert system.startswith(CHAT_SYSTEM) and system.endswith("Answer in French.")
    assert grounded[1]["content"].startswith("[Image 1]\n" + CAT.render())
    assert grounded[1]["content"].endswith("Quoi?")


@pytest.mark.parametrize("count", [1, 4])
def test_images_are_numbered_from_one(count):
    evidence = [gather([(f"thing{i}", 0.5)], []) for i in range(count)]
    chat = [{"role": "user", "content": [ImagePart(i) for i in range(count)]}]
    content = chat_messages(chat, evidence)[-1]["content"]
    for i in range(count):
        assert f"[Image {i + 1}]\nObjects recognised: thing{i} (50%)." in content
    assert "[Image 0]" not in content and f"[Image {count + 1}]" not in content
