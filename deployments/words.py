"""A text as words, for explaining it by occlusion: its words, the text without one of them, and the limit on
how many a text to explain may have. No model code: the ingress checks the limit before any work."""

import re

from deployments.errors import InvalidInput
from deployments.settings import limits

WORD = re.compile(r"\S+")


def words(text: str) -> list[re.Match]:
    return list(WORD.finditer(text))


def without(text: str, word: re.Match) -> str:
    """The text with one word removed, the spaces around it joined."""
    before, after = text[: word.start()].rstrip(), text[word.end() :].lstrip()
    return f"{before} {after}".strip() if before and after else before or after


def check_words(text: str) -> int:
    """The number of words of a text to explain; over ``max_explain_words``: 422, before any work."""
    count, most = len(words(text)), limits().max_explain_words
    if count > most:
        raise InvalidInput(f"the text has {count} words; explanations take at most {most}", field="text")
    return count
