"""``make bench-gpu``: the GPU profile's image models on the GPU of the machine it runs on.

``serve_config.gpu.yaml`` gives each vision replica 0.25 of a GPU (four share one) with batches of at most
4, and each explainer replica 0.1. This measures, with the deployments' own model code (``VisionModel``,
``ImageExplainer``) and no Serve around it, what those choices give:

1. the vision model on the GPU by batch size, in one process (one replica): images per second and the time
   of one batch, the copy to and from the GPU included;
2. four such processes at once on the one GPU (four quarter-GPU replicas) against one alone, at the batch
   size the config ships and at a larger one;
3. the GPU memory one replica holds (its CUDA context and the model), against a quarter of the card;
4. what stays on the CPU: decoding and preparing an image (the ingress's work), in CPU milliseconds per
   image, and so how many CPUs keep one GPU's vision replicas busy;
5. explanations on the GPU: Grad-CAM and Integrated Gradients (16 and 64 steps).

The text encoder and the language model are not measured here: their weights (88 MB and 94 MB) are larger
than what the machine this was run on could be sent.

Writes ``docs/benchmarks/gpu.json`` and docs/BENCHMARKS.md again with its section (``benchmarks/report.py``,
from the last CPU run's results), or only ``$BENCH_GPU_OUT`` where that is set. Knobs: ``BENCH_DURATION_S`` (per
point, default 5).
"""

import base64
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR = ROOT / "docs" / "benchmarks"
OUT = Path(os.environ.get("BENCH_GPU_OUT", REPORT_DIR / "gpu.json"))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "5"))
BATCHES = (1, 4, 8, 16, 32, 64)
SHARED_BATCHES = (4, 32)  # the shipped max_batch_size, and a larger one
REPLICAS_PER_GPU = 4  # num_gpus: 0.25 in serve_config.gpu.yaml


def log(message: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def prepared_image(vision) -> np.ndarray:
    from deployments.imaging import decode_base64, decode_image, prepare
    from deployments.settings import limits

    payload = base64.b64encode(jpeg()).decode()
    return prepare(decode_image(decode_base64(payload, limits()), limits()), vision.spec)


def timed(step, duration_s: float) -> tuple[int, float]:
    """Run ``step`` (which returns how many images it did) for about ``duration_s``: (images, seconds)."""
    step()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        done += step()
    return done, time.perf_counter() - start


def vision_by_batch(vision, image: np.ndarray) -> dict:
    """Images per second and milliseconds per batch, one process."""
    rows = {}
    for batch in BATCHES:
        pixels = [image] * batch
        done, seconds = timed(lambda pixels=pixels: len(vision.classify(pixels, top_k=5)), DURATION_S)
        rows[batch] = row = {"images_per_s": done / seconds, "batch_ms": 1000.0 * seconds * batch / done}
        log(f"vision batch {batch}: {row['images_per_s']:.0f} images/s, {row['batch_ms']:.2f} ms a batch")
    return rows


def cpu_side(vision) -> dict:
    """CPU milliseconds per image for what the ingress does before a model sees it: base64, decode, resize,
    crop (one thread)."""
    from deployments.imaging import decode_base64, decode_image, prepare
    from deployments.settings import limits

    payload = base64.b64encode(jpeg()).decode()

    def step() -> int:
        prepare(decode_image(decode_base64(payload, limits()), limits()), vision.spec)
        return 1

    step()
    start_cpu, start, done = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - start < DURATION_S / 2:
        done += step()
    return {"decode_and_prepare_cpu_ms": 1000.0 * (time.process_time() - start_cpu) / done}


def explanations(vision, image: np.ndarray) -> dict:
    from deployments.saliency import ImageExplainer

    explainer = ImageExplainer(vision)
    explainer.warm_up()
    rows = {}
    for method, steps in (("gradcam", 16), ("integrated_gradients", 16), ("integrated_gradients", 64)):
        name = method if method == "gradcam" else f"{method} ({steps} steps)"

        def step(method=method, steps=steps) -> int:
            explainer.explain(image, None, method, steps, 600.0)
            return 1

        done, seconds = timed(step, DURATION_S / 2)
        rows[name] = {"ms": 1000.0 * seconds / done}
        log(f"explain {name}: {rows[name]['ms']:.1f} ms")
    return rows


def replica(batch: int, duration_s: float, ready, go, results) -> None:
    """One vision replica in its own process: load and warm up, say so, wait for ``go``, run batches for
    ``duration_s``."""
    from deployments.vision import VisionConfig, VisionModel

    torch.set_num_threads(1)
    vision = VisionModel(VisionConfig())
    pixels = [prepared_image(vision)] * batch
    vision.classify(pixels, top_k=5)
    ready.put(os.getpid())
    go.wait()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        done += len(vision.classify(pixels, top_k=5))
    results.put({"images": done, "seconds": time.perf_counter() - start})


def shared_gpu(processes: int, batch: int) -> dict:
    """``processes`` replicas on the one GPU at once: their images per second together, and the GPU memory
    each holds (the card's free memory before they start and once all are warm, per replica)."""
    context = mp.get_context("spawn")
    ready, go, results = context.Queue(), context.Event(), context.Queue()
    free_before, _ = torch.cuda.mem_get_info()
    workers = [context.Process(target=replica, args=(batch, DURATION_S, ready, go, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=600)
    free_during, _ = torch.cuda.mem_get_info()
    go.set()
    rows = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    total = sum(row["images"] / row["seconds"] for row in rows)
    mib = (free_before - free_during) / processes / 2**20
    log(f"{processes} replica(s), batch {batch}: {total:.0f} images/s together, {mib:.0f} MiB of GPU each")
    return {"images_per_s": total, "gpu_mib_per_replica": mib}


def report(gpu: dict, serving_cpu_ms: float | None = None) -> list[str]:
    """The GPU profile's section of docs/BENCHMARKS.md; ``serving_cpu_ms``: the cluster's CPU per vision
    request outside the models, from the CPU benchmark."""
    machine = gpu["machine"]
    quarter_mib = machine["gpu_memory_mib"] / REPLICAS_PER_GPU
    lines = [
        "## GPU profile",
        "",
        f"Generated by `make bench-gpu` (benchmarks/gpu.py) on another machine: one {machine['gpu']} "
        f"({machine['gpu_memory_mib'] / 1024:.0f} GiB), {machine['cpus']} CPUs, Python {machine['python']}, torch "
        f"{machine['torch']}, CUDA {machine['cuda']}. The deployments' own model code ({gpu['model']}) in-process, "
        f"without Serve: what a vision replica of `serve_config.gpu.yaml` (0.25 GPU, batches of at most 4) can "
        f"do, and four of them on one GPU. Each point ran {machine['duration_s']:.0f} s after a warm-up; a batch's "
        "time includes the copies to and from the GPU. The image models only: the text encoder and the language "
        "model are not part of this profile yet.",
        "",
        "**One replica, by batch size**",
        "",
        "| batch | images/s | ms a batch |",
        "|---|---|---|",
    ]
    for batch, row in gpu["vision_by_batch"].items():
        lines.append(f"| {batch} | {row['images_per_s']:.0f} | {row['batch_ms']:.2f} |")
    lines += [
        "",
        f"**{REPLICAS_PER_GPU} replicas on the one GPU at once** (each its own process, as Serve runs them)",
        "",
        f"| batch | 1 replica, images/s | {REPLICAS_PER_GPU} replicas together, images/s | ratio | GPU memory per "
        f"replica (a quarter of the card: {quarter_mib:.0f} MiB) |",
        "|---|---|---|---|---|",
    ]
    for batch, by_count in gpu["shared"].items():
        one, many = by_count["1"], by_count[str(REPLICAS_PER_GPU)]
        lines.append(
            f"| {batch} | {one['images_per_s']:.0f} | {many['images_per_s']:.0f} | "
            f"{many['images_per_s'] / one['images_per_s']:.2f} | {many['gpu_mib_per_replica']:.0f} MiB |"
        )
    lines += ["", "**Explanations on the GPU** (one at a time, after a warm-up)", "", "| method | ms |", "|---|---|"]
    lines += [f"| {name} | {row['ms']:.1f} |" for name, row in gpu["explanations"].items()]
    decode_ms = gpu["cpu_side"]["decode_and_prepare_cpu_ms"]
    shipped = gpu["shared"][str(min(SHARED_BATCHES))][str(REPLICAS_PER_GPU)]["images_per_s"]
    lines += [
        "",
        f"**What stays on the CPU.** Decoding and preparing the photograph took {decode_ms:.1f} ms of CPU there: "
        f"at the {shipped:.0f} images/s that four replicas with the shipped batch size take, that alone keeps "
        f"{shipped * decode_ms / 1000:.1f} CPUs busy.",
    ]
    if serving_cpu_ms:
        lines[-1] += (
            f" The serving path outside the models cost {serving_cpu_ms:.1f} ms of CPU per vision request on the "
            f"2-core machine above (Where the CPU goes): at that cost the GPU machine's {machine['cpus']} CPUs "
            f"answer at most {machine['cpus'] * 1000 / serving_cpu_ms:.0f} requests/s, "
            f"{machine['cpus'] * 1000 / serving_cpu_ms / shipped:.0%} of what its GPU's four replicas take. On a "
            "GPU node the request path, not the GPU, is the limit: give the node's CPUs to ingress replicas, and "
            "send several images per request (the Open Inference Protocol's `vision` model takes up to 16)."
        )
    return lines


def main() -> None:
    from deployments.vision import VisionConfig, VisionModel

    if not torch.cuda.is_available():
        sys.exit("bench-gpu needs a CUDA GPU that torch can see")
    torch.set_num_threads(1)  # as each replica runs
    properties = torch.cuda.get_device_properties(0)
    vision = VisionModel(VisionConfig())
    image = prepared_image(vision)
    results = {
        "machine": {
            "gpu": properties.name,
            "gpu_memory_mib": properties.total_memory / 2**20,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "duration_s": DURATION_S,
        },
        "model": f"{vision.name} {vision.version}",
        "vision_by_batch": vision_by_batch(vision, image),
        "cpu_side": cpu_side(vision),
        "explanations": explanations(vision, image),
    }
    del vision
    torch.cuda.empty_cache()
    results["shared"] = {
        str(batch): {str(n): shared_gpu(n, batch) for n in (1, REPLICAS_PER_GPU)} for batch in SHARED_BATCHES
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(report(results)))
    if OUT == REPORT_DIR / "gpu.json" and (REPORT_DIR / "results.json").exists():
        rewrite_report()


def rewrite_report() -> None:
    """docs/BENCHMARKS.md again from the last CPU benchmark's results, with this GPU section."""
    from benchmarks.report import write_report

    results = json.loads((REPORT_DIR / "results.json").read_text())
    write_report(results, REPORT_DIR / "throughput.png", ROOT / "docs" / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
