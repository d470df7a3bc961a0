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

Descriptions are not captions from a trained captioning model: a 135M-parameter model writes one or two
sentences from the evidence, guided by a few worked examples (chosen by whether text was found, since a
small model copies what its examples contain). The evidence is returned with the description so a client
can check it.
"""

from dataclasses import dataclass

from deployments.contracts import OcrLine

MAX_CLASSES = 3
MIN_CLASS_PROBABILITY = 0.1
MAX_TEXT_CHARS = 400
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

    def render(self) -> str:
        classes = ", ".join(f"{name} ({probability:.0%})" for name, probability in self.classes)
        text = f'"{self.text}"' if self.text else "no text"
        return f"Objects recognised: {classes or 'nothing with confidence'}.\nText read: {text}."


def gather(classes: list[tuple[str, float]], lines: list[OcrLine]) -> Evidence:
    """Evidence from the vision model's top classes (best first) and OCR's lines, within the bounds above."""
    kept = [(name, probability) for name, probability in classes[:MAX_CLASSES] if probability >= MIN_CLASS_PROBABILITY]
    text = TEXT_SEPARATOR.join(" ".join(line.text.split()) for line in lines)
    truncated = len(text) > MAX_TEXT_CHARS
    if truncated:
        text = text[: MAX_TEXT_CHARS - 1].rstrip() + "…"
    return Evidence(classes=kept, lines=lines, text=text, text_truncated=truncated)


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


def chat_messages(messages: list[dict], evidence: list[Evidence]) -> list[dict[str, str]]:
    """A chat whose messages' content is a list of ``str`` and ``ImagePart``, as plain-text messages: each image
    part replaced by ``[Image N]`` and its evidence, after a system message that says what that is."""
    grounded = []
    for message in messages:
        parts = message["content"] if isinstance(message["content"], list) else [message["content"]]
        pieces = [
            f"[Image {part.index + 1}]\n{evidence[part.index].render()}" if isinstance(part, ImagePart) else part
            for part in parts
        ]
        grounded.append({"role": message["role"], "content": "\n\n".join(pieces)})
    if grounded and grounded[0]["role"] == "system":  # one system message: ours, then the caller's
        return [{"role": "system", "content": f"{CHAT_SYSTEM}\n\n{grounded[0]['content']}"}, *grounded[1:]]
    return [{"role": "system", "content": CHAT_SYSTEM}, *grounded]
