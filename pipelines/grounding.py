"""What the language model is told about an image: the evidence the vision and OCR models found, in a bounded,
documented form, and the prompts that ground its answers in it.

The language model never sees pixels. An image becomes *evidence*: the ImageNet classes the vision model is
most sure of (at most ``MAX_CLASSES``, each at least ``MIN_CLASS_PROBABILITY``, with its probability) and the
text OCR read (lines in reading order, at most ``MAX_TEXT_CHARS`` characters in all). Its rendering,
exactly as the model reads it::

    Objects recognised: Egyptian cat (72%), tiger cat (15%), tabby (13%).
    Text read: "OPEN SESAME / Soup of the day".

(``Text read: no text.`` when OCR found none.) In a chat, each image part becomes ``[Image N]`` followed by its
evidence, in place, and a system message tells the model to answer about images from that evidence only.

With knowledge, the evidence also carries what the cluster's knowledge graph (WordNet) says about the classes
in it: each class's definition and what it is a kind of, at most ``MAX_FACT_CHARS`` characters each::

    Known facts: Egyptian cat: a domestic cat of Egypt. It is a kind of domestic cat, cat, feline, carnivore.

and in a chat, the facts about the concepts the user's last message names go in the system message
(``knowledge_message``). Each fact's synset is returned with the answer as its source.

Descriptions are not captions from a trained captioning model: a 135M-parameter model writes one or two
sentences from the evidence, guided by a few worked examples (chosen by whether text was found, since a
small model copies what its examples contain). The evidence is returned with the description so a client
can check it.
"""

from dataclasses import dataclass, field

from deployments.contracts import OcrLine
from knowledge.graph import Fact

MAX_CLASSES = 3
MIN_CLASS_PROBABILITY = 0.1
MAX_TEXT_CHARS = 400
MAX_FACTS = 3  # facts about an image's classes, or about the concepts a chat message names
MAX_FACT_CHARS = 300
TEXT_SEPARATOR = " / "

DESCRIBE_SYSTEM = (
    "You describe an image in one or two sentences from the evidence you are given: the objects an image "
    "classifier recognised, with its confidence, and the text a text reader found. Use only the evidence. "
    "Do not add objects, people, colours or text that are not in the evidence."
)
DESCRIBE_ASK = "Describe the image."
CHAT_SYSTEM = (
    "Images in this conversation are given to you as evidence, marked [Image N]: the objects an image "
    "classifier recognised in it, with its confidence, and the text a text reader found in it. You cannot see "
    "the images. Answer questions about an image from its evidence only, and say so when the evidence does "
    "not tell."
)


@dataclass
class Evidence:
    """What the models found in one image, as far as the language model is told."""

    classes: list[tuple[str, float]]  # the classes put in the prompt, most likely first
    lines: list[OcrLine]  # every line OCR read, in reading order
    text: str  # the OCR text put in the prompt ("" if none), at most MAX_TEXT_CHARS
    text_truncated: bool  # OCR read more than the prompt holds
    facts: list[Fact] = field(default_factory=list)  # what the knowledge graph says about the classes

    def render(self) -> str:
        classes = ", ".join(f"{name} ({probability:.0%})" for name, probability in self.classes)
        text = f'"{self.text}"' if self.text else "no text"
        rendered = f"Objects recognised: {classes or 'nothing with confidence'}.\nText read: {text}."
        if self.facts:
            rendered += "\nKnown facts: " + " ".join(render_fact(fact) for fact in self.facts)
        return rendered


def render_fact(fact: Fact) -> str:
    text = fact.render()
    return text if len(text) <= MAX_FACT_CHARS else text[: MAX_FACT_CHARS - 1].rstrip() + "…"


def knowledge_message(facts: list[Fact]) -> str:
    """The system message's part that gives the facts about the concepts a chat message names."""
    return "Facts from the service's knowledge graph, to answer from: " + " ".join(render_fact(f) for f in facts)


def kept_classes(classes: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The classes the prompt gets: the likely ones among the best."""
    return [(name, probability) for name, probability in classes[:MAX_CLASSES] if probability >= MIN_CLASS_PROBABILITY]


def gather(classes: list[tuple[str, float]], lines: list[OcrLine], facts: list[Fact] = ()) -> Evidence:
    """Evidence from the vision model's top classes (best first), OCR's lines and, with knowledge, the facts
    about the classes kept, within the bounds above."""
    text = TEXT_SEPARATOR.join(" ".join(line.text.split()) for line in lines)
    truncated = len(text) > MAX_TEXT_CHARS
    if truncated:
        text = text[: MAX_TEXT_CHARS - 1].rstrip() + "…"
    return Evidence(kept_classes(classes), lines, text, truncated, list(facts)[:MAX_FACTS])


def _example(classes: list[tuple[str, float]], lines: list[str]) -> Evidence:
    return gather(classes, [OcrLine(text, 1.0, []) for text in lines])


# Worked examples: the shape of a good answer. None shares a subject with the test images.
EXAMPLES_WITHOUT_TEXT = (
    (_example([("golden retriever", 0.81), ("Labrador retriever", 0.12)], []),
     "A photo of a dog, most likely a golden retriever."),
    (_example([("pizza", 0.93)], []), "A photo of food: a pizza."),
    (_example([("hammer", 0.88)], []), "A photo of a tool: a hammer."),
    (_example([("sports car", 0.55), ("convertible", 0.30)], []),
     "A photo of a car, most likely a sports car or a convertible."),
)  # fmt: skip
EXAMPLES_WITH_TEXT = (
    (_example([("street sign", 0.64), ("traffic light", 0.15)], ["ONE WAY"]),
     'A street sign, probably near a traffic light, with the words "ONE WAY" on it.'),
    (_example([("menu", 0.71)], ["DAILY SPECIALS", "Soup of the day"]),
     'A menu that reads "DAILY SPECIALS / Soup of the day".'),
)  # fmt: skip


def describe_messages(evidence: Evidence) -> list[dict[str, str]]:
    """The chat that asks for a description of one image from its evidence."""
    messages = [{"role": "system", "content": DESCRIBE_SYSTEM}]
    for example, answer in EXAMPLES_WITH_TEXT if evidence.text else EXAMPLES_WITHOUT_TEXT:
        messages.append({"role": "user", "content": f"{example.render()}\n{DESCRIBE_ASK}"})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": f"{evidence.render()}\n{DESCRIBE_ASK}"})
    return messages


@dataclass
class ImagePart:
    """Where an image was in a chat message: the index of its evidence among the chat's images."""

    index: int


def chat_messages(messages: list[dict], evidence: list[Evidence], facts: list[Fact] = ()) -> list[dict[str, str]]:
    """A chat whose messages' content is a list of ``str`` and ``ImagePart``, as plain-text messages: each image
    part replaced by ``[Image N]`` and its evidence, after a system message that says what that is (and, with
    ``facts``, gives them)."""
    system = CHAT_SYSTEM if evidence else ""
    if facts:
        system = f"{system}\n\n{knowledge_message(list(facts)[:MAX_FACTS])}".strip()
    grounded = []
    for message in messages:
        if not isinstance(message.get("content"), list):
            grounded.append(message)  # text, or an assistant's tool calls: kept as they are
            continue
        pieces = [
            f"[Image {part.index + 1}]\n{evidence[part.index].render()}" if isinstance(part, ImagePart) else part
            for part in message["content"]
        ]
        grounded.append({**message, "content": "\n\n".join(pieces)})
    if not system:
        return grounded
    if grounded and grounded[0]["role"] == "system":  # one system message: ours, then the caller's
        return [{"role": "system", "content": f"{system}\n\n{grounded[0]['content']}"}, *grounded[1:]]
    return [{"role": "system", "content": system}, *grounded]
