"""Build a drift reference profile from reference data, with the same model code the deployments serve.

    python -m monitoring.tools.profile vision --images DIR [--augment 40] [--out monitoring/profiles/mobilenet_v2.json]
    python -m monitoring.tools.profile vision --images skimage --augment 40
    python -m monitoring.tools.profile text --texts monitoring/reference/english.txt

``--images`` is a folder of images (searched recursively), or ``skimage`` for
scikit-image's bundled sample photographs. ``--augment N`` adds N random
crops/flips/brightness changes of every image (seeded), which is how a handful
of photos stands for the variety of real traffic. ``--texts`` is a text file,
one input per line, or a JSONL file with a ``text`` field per line.
Deployments load ``monitoring/profiles/<model name>.json`` unless
``user_config.drift.reference`` names another file.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from deployments.imaging import decode_image, prepare
from deployments.settings import limits
from monitoring.drift import PROFILES_DIR, ReferenceProfile

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip


def skimage_photos() -> list[tuple[str, Image.Image]]:
    """The photographs bundled with scikit-image (no download), as RGB images."""
    import skimage.data

    photos = []
    for name in SKIMAGE_PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos.append((name, Image.fromarray(array[..., :3].astype(np.uint8))))
    return photos


def folder_images(folder: Path) -> list[tuple[str, Image.Image]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [(str(p), decode_image(p.read_bytes(), limits())) for p in files]


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (35-100% of the area), maybe mirrored, with brightness and contrast jitter."""
    width, height = image.size
    scale = rng.uniform(0.35, 1.0)
    crop_w, crop_h = max(8, int(width * np.sqrt(scale))), max(8, int(height * np.sqrt(scale)))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    out = image.crop((int(left), int(top), int(left + crop_w), int(top + crop_h)))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.75, 1.25))


def augmented(images: list[tuple[str, Image.Image]], copies: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _, image in images:
        out.append(image)
        out.extend(augment(image, rng) for _ in range(copies))
    return out


def vision_profile(images: list[Image.Image], data: str, config: dict | None = None) -> ReferenceProfile:
    from deployments.vision import VisionConfig, VisionModel

    model = VisionModel(VisionConfig.model_validate(config or {}))
    probs = np.concatenate(
        [model.predict([prepare(im, model.spec) for im in images[i : i + 32]])[0] for i in range(0, len(images), 32)]
    )
    return ReferenceProfile.from_outputs(
        model=model.name,
        version=model.version,
        data=data,
        confidences=probs.max(axis=1),
        predicted=probs.argmax(axis=1),
    )


def read_texts(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in lines]
    return lines


def text_profile(texts: list[str], data: str, config: dict | None = None) -> ReferenceProfile:
    from deployments.text import TextConfig, TextModel

    model = TextModel(TextConfig.model_validate(config or {}))
    embeddings = np.concatenate([model.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    return ReferenceProfile.from_outputs(model=model.name, version=model.version, data=data, embeddings=embeddings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m monitoring.tools.profile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    vision = sub.add_parser("vision", help="profile of the image classifier")
    vision.add_argument("--images", required=True, help="folder of images, or 'skimage'")
    vision.add_argument("--augment", type=int, default=0, help="random variants per image")
    vision.add_argument("--seed", type=int, default=0)
    text = sub.add_parser("text", help="profile of the sentence encoder")
    text.add_argument("--texts", required=True, type=Path, help=".txt (one per line) or .jsonl with 'text'")
    for p in (vision, text):
        p.add_argument("--model-config", type=json.loads, default=None, help="VisionConfig/TextConfig as JSON")
        p.add_argument("--out", type=Path, default=None, help="default: monitoring/profiles/<model name>.json")
    args = parser.parse_args(argv)

    if args.kind == "vision":
        source = skimage_photos() if args.images == "skimage" else folder_images(Path(args.images))
        images = augmented(source, args.augment, args.seed)
        what = (
            "sample photographs bundled with scikit-image"
            if args.images == "skimage"
            else f"images under {args.images}"
        )
        data = (
            f"{len(source)} {what}, each with {args.augment} random crops/flips/brightness variants (seed {args.seed})"
        )
        profile = vision_profile(images, data, args.model_config)
    else:
        texts = read_texts(args.texts)
        profile = text_profile(texts, f"{len(texts)} texts from {args.texts}", args.model_config)

    out = args.out or PROFILES_DIR / f"{profile.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    print(f"wrote {out}: {profile.model} {profile.version}, {profile.samples} samples; measures {profile.measures()}")


if __name__ == "__main__":
    main(sys.argv[1:])
