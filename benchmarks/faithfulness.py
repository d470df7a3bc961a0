"""Are the explanations faithful? Deletion curves of the explainers, against random, in this process.

An explanation that points at the wrong evidence is worse than none. The deletion test (Petsiuk et al., 2018,
RISE) takes the evidence away in the order the explanation ranks it and watches the model's answer fall:
the faster it falls, the more the explanation found what the model used. The same for a random order is the
bar to clear.

* **Images**: scikit-image's photographs (every one that ships without a download). The top class of each is
  explained by each method of the explainer (``deployments.saliency.ImageExplainer``, the deployment's own
  code); the crop is cut into 14 x 14 cells of 16 pixels, ranked by their mean saliency, and removed in ten
  steps of a tenth each: a removed cell shows a blurred copy of the image (Gaussian, radius 16), which keeps
  colours and brightness and takes away shape and texture. The curve is the class probability after each
  step, divided by the whole image's; its area (lower is better) is compared with the mean area of three
  random orders of the same cells, and with the least-salient-first order (higher is better; its area is the
  insertion curve's, Petsiuk's other test, which puts the most salient cells back into the blurred image
  first). Scattered blurred cells, as a random order makes them, are unlike any photograph and lower a
  probability by themselves, which favours random orders in deletion: the least-salient-first order, as
  contiguous as the salient-first one, is the other bar.
* **Texts**: 24 sentences on four topics; the top zero-shot label of each is explained by word occlusion
  (``deployments.words``, as the explainer does it through the text deployment); words are removed one at a
  time, most contributing first, and the label's score, divided by the first, is the curve; against five
  random orders.

Writes nothing by itself: ``make bench`` runs it in-process before the servers start and puts the results in
``docs/BENCHMARKS.md``; ``BENCH_SETUPS=faithfulness make bench`` runs it alone into the last report.
"""

import time

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageFilter

from deployments.contracts import DEFAULT_STEPS, IMAGE_METHODS
from deployments.imaging import prepare
from deployments.saliency import ImageExplainer
from deployments.scoring import similarity_scores
from deployments.text import TextConfig, TextModel
from deployments.vision import VisionConfig, VisionModel
from deployments.words import without, words

# Every photograph scikit-image ships with the package (the others need a download); ``cat`` is chelsea again.
IMAGES = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
          "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
          "rocket", "text")  # fmt: skip
CELLS = 14  # per side of the crop: cells of 16 pixels
STEPS = 10  # a tenth of the cells per step
RANDOM_ORDERS = 3
BLUR_RADIUS = 16

TOPICS = ("finance", "sports", "weather", "cooking")
SENTENCES = (
    "The central bank raised interest rates and the stock market fell sharply",
    "Investors sold their shares after the company reported a quarterly loss",
    "The bond yields climbed as inflation data surprised the markets",
    "Her savings account earns more interest than the dividend on those stocks",
    "The bank approved the mortgage once the loan officer checked his credit score",
    "Currency traders bet that the dollar would weaken against the euro",
    "The striker scored twice and the team won the championship final",
    "The goalkeeper saved a penalty in the last minute of the match",
    "She ran the marathon in record time and took the gold medal",
    "The coach benched his star player before the playoff game",
    "Fans cheered as the tennis player served an ace to win the set",
    "The cyclist attacked on the final climb and won the stage",
    "Heavy rain and strong winds are expected across the coast tomorrow",
    "The forecast says snow will fall overnight with temperatures below freezing",
    "A thunderstorm warning was issued as the humid heat built up",
    "Sunny skies and a light breeze will make the weekend warm",
    "Fog will clear by noon, followed by scattered showers in the evening",
    "The hurricane strengthened as it moved over the warm ocean",
    "Simmer the onions in butter, then add the garlic and fresh thyme",
    "Knead the dough for ten minutes and let it rise before baking the bread",
    "Whisk the eggs with sugar and fold in the flour for a light sponge cake",
    "Roast the chicken with lemon and rosemary until the skin is crisp",
    "Season the soup with salt and pepper and serve it with crusty bread",
    "Grill the steak over high heat and rest it before slicing",
)
TEXT_RANDOM_ORDERS = 5


def photograph(name: str) -> np.ndarray:
    pixels = getattr(skimage.data, name)()
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0, 1) * 255).astype(np.uint8) if pixels.max() <= 1 else pixels.astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def deletion_curve(model: VisionModel, pixels: np.ndarray, target: int, order: np.ndarray) -> np.ndarray:
    """The target's probability as the cells of ``order`` (cell indices) are replaced by a blurred copy, a tenth
    at a time, divided by the probability of the whole image: ``STEPS + 1`` values, the first 1."""
    crop = pixels.shape[0]
    blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(BLUR_RADIUS)))
    batch = []
    for step in range(STEPS + 1):
        removed = np.zeros(CELLS * CELLS, bool)
        removed[order[: round(CELLS * CELLS * step / STEPS)]] = True
        mask = np.kron(removed.reshape(CELLS, CELLS), np.ones((crop // CELLS, crop // CELLS), bool))[..., None]
        batch.append(np.where(mask, blurred, pixels))
    probs, _ = model.predict(batch)
    return probs[:, target] / max(float(probs[0, target]), 1e-12)


def area(curve: np.ndarray) -> float:
    """The area under a curve sampled at even steps from 0 to 1 (trapezoids)."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def cell_order(saliency: np.ndarray) -> np.ndarray:
    """Cells by mean saliency, most salient first."""
    size = saliency.shape[0] // CELLS
    cells = saliency.reshape(CELLS, size, CELLS, size).mean(axis=(1, 3)).ravel()
    return np.argsort(-cells, kind="stable")


def image_faithfulness(explainer: ImageExplainer, name: str, method: str, seed: int = 0) -> dict:
    """One photograph's deletion areas for one method: salient first, random (mean), least salient first."""
    model = explainer.vision
    pixels = prepare(Image.fromarray(photograph(name)), model.spec)
    result = explainer.explain(pixels, None, method, DEFAULT_STEPS, budget_s=600.0)
    order = cell_order(result.saliency)
    rng = np.random.default_rng(seed)
    randoms = [rng.permutation(CELLS * CELLS) for _ in range(RANDOM_ORDERS)]
    target = result.class_index
    return {
        "image": name,
        "class": result.class_name,
        "probability": result.probability,
        "method": method,
        "seconds": result.seconds,
        "salient_first": area(deletion_curve(model, pixels, target, order)),
        "random": float(np.mean([area(deletion_curve(model, pixels, target, r)) for r in randoms])),
        "least_salient_first": area(deletion_curve(model, pixels, target, order[::-1])),
    }


def label_score(model: TextModel, texts: list[str], label_vectors: np.ndarray, label: int, uniform: float) -> list:
    """The label's zero-shot score of each text (an empty one: ``uniform``, as the explainer scores it)."""
    kept = [text for text in texts if text]
    vectors = iter(model.embed(kept)) if kept else iter(())
    temperature = model.config.temperature
    return [float(similarity_scores(next(vectors), label_vectors, temperature)[label]) if text else uniform
            for text in texts]  # fmt: skip


def text_faithfulness(model: TextModel, sentence: str, seed: int = 0) -> dict:
    """One sentence's deletion areas: words removed most contributing first, and in random orders."""
    label_vectors = model.embed(list(TOPICS))
    uniform = 1.0 / len(TOPICS)
    start = time.perf_counter()
    found = words(sentence)
    whole = similarity_scores(model.embed([sentence])[0], label_vectors, model.config.temperature)
    label = int(np.argmax(whole))
    variants = label_score(model, [without(sentence, word) for word in found], label_vectors, label, uniform)
    contributions = whole[label] - np.array(variants)
    seconds = time.perf_counter() - start

    def curve(order) -> np.ndarray:
        texts = []
        for removed in range(len(found) + 1):
            gone = set(order[:removed].tolist())
            texts.append(" ".join(w.group() for i, w in enumerate(found) if i not in gone))
        return np.array(label_score(model, texts, label_vectors, label, uniform)) / whole[label]

    rng = np.random.default_rng(seed)
    return {
        "text": sentence,
        "label": TOPICS[label],
        "top_word": found[int(np.argmax(contributions))].group(),
        "seconds": seconds,
        "salient_first": area(curve(np.argsort(-contributions, kind="stable"))),
        "random": float(np.mean([area(curve(rng.permutation(len(found)))) for _ in range(TEXT_RANDOM_ORDERS)])),
    }


def measure(log=print) -> dict:
    """Every photograph by every method, and every sentence, on one thread as a replica runs (the process's
    thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        explainer = ImageExplainer.load(VisionConfig())
        images = []
        for name in IMAGES:
            for method in IMAGE_METHODS:
                row = image_faithfulness(explainer, name, method)
                images.append(row)
                log(f"faithfulness {name} {method}: {row['class']} deletion {row['salient_first']:.3f}, "
                    f"random {row['random']:.3f}, least salient first {row['least_salient_first']:.3f}")  # fmt: skip
        text_model = TextModel(TextConfig())
        texts = [text_faithfulness(text_model, sentence) for sentence in SENTENCES]
        return {"images": images, "texts": texts, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(threads)


def summary(rows: list[dict], keys: tuple[str, ...]) -> dict:
    return {key: float(np.mean([row[key] for row in rows])) for key in keys}


def report(results: dict) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    images, texts = results["images"], results["texts"]
    lines = [
        "## Explanations: faithfulness (benchmarks/faithfulness.py)",
        "",
        f"Deletion curves (Petsiuk et al., 2018), in-process with {results['threads']} thread. Images: the top "
        f"class of each of scikit-image's {len(IMAGES)} shipped photographs, explained by each method; the crop's "
        f"{CELLS} x {CELLS} cells are replaced by a blurred copy of the image in {STEPS} steps, most salient "
        "first, in random orders (mean of "
        f"{RANDOM_ORDERS}) and least salient first. The value is the area under the class probability divided by "
        "its first value: lower means the evidence the explanation ranked first mattered more to the model.",
        "",
        "Least salient first should keep the probability longest (higher is better; its area is that of Petsiuk's "
        "insertion curve, the most salient cells put back into the blurred image first). Scattered blurred cells, "
        "as a random order leaves them, are unlike any photograph and lower a probability by themselves, which "
        "favours the random order in deletion.",
        "",
        "| method | images | salient first | random | least salient first | salient first below random | "
        "least salient first above random | time per explanation (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in IMAGE_METHODS:
        rows = [row for row in images if row["method"] == method]
        mean = summary(rows, ("salient_first", "random", "least_salient_first", "seconds"))
        wins = sum(row["salient_first"] < row["random"] for row in rows)
        kept = sum(row["least_salient_first"] > row["random"] for row in rows)
        lines.append(
            f"| {method} | {len(rows)} | {mean['salient_first']:.3f} | {mean['random']:.3f} | "
            f"{mean['least_salient_first']:.3f} | {wins} of {len(rows)} | {kept} of {len(rows)} | "
            f"{mean['seconds'] * 1000:.0f} ms |"
        )
    text = summary(texts, ("salient_first", "random", "seconds"))
    wins = sum(row["salient_first"] < row["random"] for row in texts)
    lines += [
        "",
        f"Texts: {len(texts)} sentences on {len(TOPICS)} topics ({', '.join(TOPICS)}), the top label of each "
        "explained by word occlusion; words removed one at a time, most contributing first, against "
        f"{TEXT_RANDOM_ORDERS} random orders; the label's score divided by its first value.",
        "",
        "| explainer | texts | deletion area, top words first | random order | beats random on | "
        "time per explanation (mean) |",
        "|---|---|---|---|---|---|",
        f"| occlusion | {len(texts)} | {text['salient_first']:.3f} | {text['random']:.3f} | {wins} of {len(texts)} | "
        f"{text['seconds'] * 1000:.0f} ms |",
        "",
        "Per image (deletion area salient first / random / least salient first):",
        "",
        "| image | class (probability) | " + " | ".join(IMAGE_METHODS) + " |",
        "|---|---|" + "---|" * len(IMAGE_METHODS),
    ]
    for name in IMAGES:
        rows = {row["method"]: row for row in images if row["image"] == name}
        first = next(iter(rows.values()))
        cells = [f"{r['salient_first']:.3f} / {r['random']:.3f} / {r['least_salient_first']:.3f}"
                 for r in (rows[m] for m in IMAGE_METHODS)]  # fmt: skip
        lines.append(f"| {name} | {first['class']} ({first['probability']:.2f}) | " + " | ".join(cells) + " |")
    return lines
