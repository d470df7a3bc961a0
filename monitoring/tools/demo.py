"""Send demo traffic to a running app: ordinary inputs, then a shifted stream that trips drift detection.

    python -m monitoring.tools.demo --url http://127.0.0.1:8000 --normal-s 240 --shifted-s 240

Normal traffic: photographs (random crops of scikit-image's sample photos,
which the shipped vision profile was built from) and ordinary English
sentences. Shifted traffic: noise and solid-colour images, and text in other
languages and machine logs. Needs the ``test`` extra (scikit-image).
"""

import argparse
import io
import itertools
import random
import threading
import time
from base64 import b64encode
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from monitoring.tools.profile import augmented, skimage_photos

SAMPLES = Path(__file__).parents[1] / "samples"  # not part of the reference profiles


def _jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return b64encode(buffer.getvalue()).decode()


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def normal_inputs(seed: int = 11) -> tuple[list[str], list[str]]:
    photos = [_jpeg(image) for image in augmented(skimage_photos(), 40, seed=seed)]
    random.Random(seed).shuffle(photos)
    return photos, _lines(SAMPLES / "english.txt")


def shifted_inputs(seed: int = 11) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(60):
        if i % 2:
            array = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        else:
            array = np.tile(rng.integers(0, 256, 3).astype(np.uint8), (256, 256, 1))
        images.append(_jpeg(Image.fromarray(array)))
    return images, _lines(SAMPLES / "other_languages.txt") + _lines(SAMPLES / "machine_logs.txt")


def drive(url: str, images: list[str], texts: list[str], seconds: float, clients: int) -> dict[int, int]:
    """Closed-loop clients for ``seconds``: vision, text and multimodal requests in turn."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)  # every client draws its own inputs, as independent users would
        with httpx.Client(base_url=url, timeout=60) as http:
            for n in itertools.count(index):
                if time.monotonic() >= deadline:
                    break
                image, text = rng.choice(images), rng.choice(texts)
                route, body = [
                    ("/v1/vision/classify", {"image": image, "top_k": 3}),
                    ("/v1/text/embed", {"texts": [text]}),
                    ("/v1/multimodal/analyze", {"image": image, "text": text, "labels": ["animal", "food", "place"]}),
                ][n % 3]
                status = http.post(route, json=body).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m monitoring.tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--normal-s", type=float, default=240)
    parser.add_argument("--shifted-s", type=float, default=240)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    for phase, (images, texts), seconds in [
        ("normal", normal_inputs(), args.normal_s),
        ("shifted", shifted_inputs(), args.shifted_s),
    ]:
        if seconds <= 0:
            continue
        started = time.strftime("%H:%M:%S")
        statuses = drive(args.url, images, texts, seconds, args.clients)
        print(f"{started} {phase}: {sum(statuses.values())} requests in {seconds:.0f} s, statuses {statuses}")


if __name__ == "__main__":
    main()
