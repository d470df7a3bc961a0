"""Which runtime and decode for the vision and text models: eager PyTorch and its options against ONNX Runtime,
on one thread, with the answers compared to eager PyTorch's (benchmarks/NOTES.md, "Model runtimes").

Run: ``.venv/bin/python -m benchmarks.runtimes`` (about two minutes on two cores; nothing else should run).
Prints a Markdown table per model and the accuracy checks behind what ships:

* vision: eager, channels-last, ``torch.compile`` (when it compiles here) and ONNX Runtime fp32, batch 1 and 4;
* text: eager and ONNX Runtime fp32 at batch 1 and 16, and ONNX Runtime's dynamic int8, with its cosine to eager;
* JPEG draft mode (libjpeg's DCT-domain downscale) against a full decode, on scikit-image's photographs and
  4x upscaled copies of them: top-1 agreement and the largest probability difference.
"""

import copy
import io
import time

import numpy as np
import skimage.data
import torch
from PIL import Image

from deployments import ort
from deployments.imaging import prepare
from deployments.text import TextConfig, TextModel
from deployments.vision import VisionConfig, VisionModel

CPU = torch.device("cpu")
# The reference inputs (tests/unit/test_runtimes.py holds the shipped runtimes to them too): scikit-image's
# photographs and test images that ship with it (no download), as RGB, and texts short, long and past the window.
SKIMAGE = (
    "astronaut brick camera cat cell checkerboard chelsea clock coffee coins colorwheel grass gravel "
    "hubble_deep_field immunohistochemistry logo microaneurysms moon page retina rocket text"
).split()
TEXTS = [
    "a photo of a cat",
    "my cat asleep on the sofa",
    "a cup of coffee",
    "a rocket launch",
    "Stock markets fell sharply on Monday after the central bank raised rates.",
    "ok",
    "word " * 400,  # past the model's window: truncated
]


def per_call_ms(call, repeat: int = 30) -> float:
    for _ in range(3):
        call()
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    return 1000 * (time.perf_counter() - start) / repeat


def vision_rows() -> list[str]:
    eager = VisionModel(VisionConfig(), device=CPU, runtime="torch")
    fast = VisionModel(VisionConfig(), device=CPU, runtime="onnxruntime")
    rows = ["| vision (MobileNetV2) | batch 1, ms | batch 4, ms per image |", "|---|---|---|"]
    inputs = {b: torch.randn(b, 3, 224, 224) for b in (1, 4)}

    def row(name, call):
        one, four = (per_call_ms(lambda b=b: call(inputs[b])) / b for b in (1, 4))
        rows.append(f"| {name} | {one:.1f} | {four:.1f} |")

    with torch.inference_mode():
        row("eager PyTorch", eager.model)
        channels_last = copy.deepcopy(eager.model).to(memory_format=torch.channels_last)
        row("eager, channels-last", lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)))
        try:
            compiled = torch.compile(copy.deepcopy(eager.model))
            start = time.perf_counter()
            compiled(inputs[1])
            compile_s = time.perf_counter() - start
            row(f"torch.compile (first call {compile_s:.0f} s)", compiled)
        except Exception as exc:  # no C++ compiler, or an unsupported build
            rows.append(f"| torch.compile | failed: {type(exc).__name__} | |")
    row(f"ONNX Runtime fp32 ({ort.version()})", lambda x: fast.forward(x))
    return rows


def text_rows() -> list[str]:
    eager = TextModel(TextConfig(runtime="torch"), device=CPU)
    fast = TextModel(TextConfig(runtime="onnxruntime"), device=CPU)
    short, batch = eager.tokenize(["a photo of a cat on the sofa"]), eager.tokenize(TEXTS[:5] * 3 + TEXTS[:1])
    rows = ["| text (all-MiniLM-L6-v2) | 1 text, ms | 16 texts, ms | cosine to eager (min) |", "|---|---|---|---|"]
    for name, model in (("eager PyTorch", eager), (f"ONNX Runtime fp32 ({ort.version()})", fast)):
        cosine = float((model.embed(TEXTS) * eager.embed(TEXTS)).sum(1).min())
        rows.append(
            f"| {name} | {per_call_ms(lambda m=model: m.encode(short)):.1f} | "
            f"{per_call_ms(lambda m=model: m.encode(batch), 10):.1f} | {cosine:.5f} |"
        )
    rows.append(int8_row(fast, eager, short, batch))
    return rows


def int8_row(fast: TextModel, eager: TextModel, short: dict, batch: dict) -> str:
    """ONNX Runtime's dynamic int8 quantisation of the exported encoder (weights int8, activations at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = list(short)
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"embeddings": {0: "batch"}}
    from deployments.text import _PooledEncoder

    exported = ort.export(_PooledEncoder(fast.model, names), tuple(short.values()), names, ["embeddings"], axes)
    fp32, int8 = io.BytesIO(exported), io.BytesIO()
    model = onnx.load(fp32)
    quantize_dynamic(model, int8, weight_type=QuantType.QInt8)
    session = ort.session(int8.getvalue(), 1)

    def run(tokens):
        return session.run(None, {n: tokens[n].numpy() for n in names})[0]

    tokens = eager.tokenize(TEXTS)
    cosine = float((run(tokens) * eager.encode(tokens)).sum(1).min())
    return (
        f"| ONNX Runtime dynamic int8 | {per_call_ms(lambda: run(short)):.1f} | "
        f"{per_call_ms(lambda: run(batch), 10):.1f} | {cosine:.5f} |"
    )


def draft_rows(target: int) -> str:
    """JPEG draft decode (``Image.draft`` to at least ``target`` on both sides) against a full decode."""
    vision = VisionModel(VisionConfig(), device=CPU)
    agree = total = 0
    worst, full_s, draft_s = 0.0, 0.0, 0.0
    for name in SKIMAGE:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for copy_ in (image, image.resize((image.width * 4, image.height * 4), Image.Resampling.LANCZOS)):
            out = io.BytesIO()
            copy_.save(out, "JPEG", quality=90)
            raw = out.getvalue()
            start = time.perf_counter()
            full = Image.open(io.BytesIO(raw))
            full.load()
            full_s += time.perf_counter() - start
            start = time.perf_counter()
            reduced = Image.open(io.BytesIO(raw))
            reduced.draft("RGB", (target, target))
            reduced.load()
            draft_s += time.perf_counter() - start
            (a, b), _ = vision.predict([prepare(full.convert("RGB"), vision.spec), prepare(reduced, vision.spec)])
            total += 1
            agree += int(a.argmax() == b.argmax())
            worst = max(worst, float(np.abs(a - b).max()))
    return (
        f"| draft to >= {target} px | {agree} of {total} | {worst:.3f} | "
        f"{1000 * full_s / total:.0f} ms | {1000 * draft_s / total:.0f} ms |"
    )


def main() -> None:
    torch.set_num_threads(1)
    print("\n".join(vision_rows()), "\n")
    print("\n".join(text_rows()), "\n")
    print("| JPEG decode | top-1 as a full decode | largest probability difference | full decode | draft |")
    print("|---|---|---|---|---|")
    for target in (256, 512):
        print(draft_rows(target))


if __name__ == "__main__":
    main()
