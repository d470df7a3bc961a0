"""Does the knowledge graph make answers better? Questions whose answers are in WordNet's definitions, asked
through the OpenAI chat route with and without ``knowledge`` (the graph's facts in the prompt), against a
running app:

    .venv/bin/python -m benchmarks.knowledge --url http://127.0.0.1:8000

A question counts as answered when the reply contains one of its expected words (taken from the definition:
"Australia" for a dingo). Two questions are about photographs (the image's class is what they ask about).
Prints a Markdown table per question and the totals; docs/BENCHMARKS.md quotes a run.
"""

import argparse
import base64
import io
import time

import openai
import skimage.data
from PIL import Image

# (question, words one of which the answer must contain, image or None)
QUESTIONS = [
    ("What is a dingo, and where does it live?", ("australia",), None),
    ("What is an axolotl?", ("salamander", "mexico"), None),
    ("What is a hartebeest?", ("antelope",), None),
    ("What is a whippet?", ("greyhound",), None),
    ("What is a loupe used for?", ("magnif", "jewel"), None),
    ("What is in carbonara sauce?", ("egg", "bacon", "ham"), None),
    ("What kind of instrument is a marimba?", ("percussion", "wooden bars"), None),
    ("What is a yurt?", ("domed", "nomad", "mongol", "portable"), None),
    ("What is a bolete?", ("fungus", "fungi", "mushroom"), None),
    ("What is a chiton?", ("mollusk", "mollusc"), None),
    ("What is a sorrel, the animal?", ("horse",), None),
    ("What is a tabby?", ("grey", "gray", "tawny", "mottled"), None),
    ("What country does this kind of cat come from?", ("egypt",), "chelsea"),
    ("How is this drink made?", ("steam", "pressure"), "coffee"),
]


def data_url(name: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(client: openai.OpenAI, question: str, image: str | None, knowledge: bool) -> tuple[str, float, int, list]:
    content = question if image is None else [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}
    ]  # fmt: skip
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=60,
        extra_body={"knowledge": knowledge},
    )  # fmt: skip
    sources = [source["name"] for source in (reply.model_extra or {}).get("knowledge") or []]
    return reply.choices[0].message.content, time.perf_counter() - start, reply.usage.prompt_tokens, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused", timeout=300, max_retries=0)
    totals = {False: [0, 0.0, 0], True: [0, 0.0, 0]}
    print("| question | without knowledge | with knowledge | sources |")
    print("|---|---|---|---|")
    for question, words, image in QUESTIONS:
        cells = []
        for knowledge in (False, True):
            answer, seconds, prompt_tokens, sources = ask(client, question, image, knowledge)
            hit = any(word in answer.lower() for word in words)
            totals[knowledge][0] += hit
            totals[knowledge][1] += seconds
            totals[knowledge][2] += prompt_tokens
            cells.append(("✓ " if hit else "✗ ") + " ".join(answer.split())[:90].replace("|", "/"))
        where = f" (image: {image})" if image else ""
        print(f"| {question}{where} | {cells[0]} | {cells[1]} | {', '.join(sources)} |")
    n = len(QUESTIONS)
    print()
    for knowledge in (False, True):
        hits, seconds, tokens = totals[knowledge]
        label = "with" if knowledge else "without"
        print(f"{label} knowledge: {hits}/{n} answered, mean {seconds / n:.2f} s, mean prompt {tokens / n:.0f} tokens")


if __name__ == "__main__":
    main()
