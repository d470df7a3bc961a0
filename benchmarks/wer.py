"""Word error rate, as speech recognition is scored: the word-level edit distance between what was said and what
was heard, over the words said, both normalised the way transcripts differ without being wrong (Whisper writes
"Mr." and "10 meters" where a reference says "mister" and "ten meters"). Used by ``make bench`` and the tests."""

import re

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
ORDINALS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor"}
"""Abbreviations Whisper writes for words the references spell out."""


def number_words(n: int) -> str:
    """``n`` in English words, as a reference transcript spells it: 115 is "one hundred fifteen"; from a
    trillion on, digit by digit."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f" {ONES[n % 10]}" if n % 10 else "")
    if n >= 10**12:
        return " ".join(ONES[int(d)] for d in str(n))
    for size, name in SCALES:
        if n >= size:
            head, rest = divmod(n, size)
            return f"{number_words(head)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise AssertionError(n)  # unreachable: every n >= 100 has a scale


def _ordinal(words: str) -> str:
    *head, last = words.split()
    last = ORDINALS.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return " ".join([*head, last])


def normalise(text: str) -> list[str]:
    """The words of ``text`` as compared: lower case, numbers as words ("10th" as "tenth"), "%" as "percent",
    apostrophes dropped ("don't" is "dont"), other punctuation as spaces, titles spelled out ("mr" is
    "mister")."""
    text = text.lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000
    text = text.replace("%", " percent ")
    text = re.sub(r"(\d+)(?:st|nd|rd|th)\b", lambda m: f" {_ordinal(number_words(int(m.group(1))))} ", text)
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    text = re.sub(r"['’]", "", text)
    text = re.sub(r"[\W_]+", " ", text)
    return [TITLES.get(word, word) for word in text.split()]


def edits(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance: the substitutions, deletions and insertions that turn ``reference``
    into ``hypothesis``."""
    previous = list(range(len(hypothesis) + 1))
    for i, word in enumerate(reference, start=1):
        current = [i]
        for j, heard in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != heard)))
        previous = current
    return previous[-1]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """The errors in ``hypothesis`` and the words of ``reference``, both normalised."""
    ref = normalise(reference)
    return edits(ref, normalise(hypothesis)), len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    errors, words = word_errors(reference, hypothesis)
    return errors / max(words, 1)
