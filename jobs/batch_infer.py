"""Batch inference as a Ray job, through the deployed app's own model deployments.

    ray job submit --working-dir . -- python -m jobs.batch_infer --images photos/ --out results/photos
    ray job submit --working-dir . -- python -m jobs.batch_infer --texts notes.jsonl --out results/notes
    ray job submit --working-dir . -- python -m jobs.batch_infer --images photos/ --describe --out results/described
    ray job submit --working-dir . -- python -m jobs.batch_infer --transcribe recordings/ --out results/heard

Images: every image file under a folder (sorted by path). Texts: a JSONL file
with a ``text`` field (and an optional ``id``) per line. With ``--describe``, each image is described as
``POST /v1/multimodal/describe`` does (vision and OCR in parallel, then the language model from their
evidence), and its result carries the description and that evidence. With ``--transcribe``, every audio file
under a folder (WAV, FLAC, MP3, Ogg, Opus, WebM, M4A, AAC) is transcribed as ``POST /v1/audio/transcriptions``
does, within the same audio limits, and its result carries the text, the language, the duration and the
segments with their times. Records are processed
in fixed chunks; each chunk's results and errors are written to a temporary
file and renamed into place when the chunk is complete, so an interrupted job
started again with the same arguments skips finished chunks and redoes the
one it was in: no record is lost and none is written twice.

Output folder:

- ``results/part-NNNNN.jsonl``: one line per record that succeeded;
- ``errors/part-NNNNN.jsonl``: one line per record that failed, with the reason;
- ``summary.json``: records, failures, throughput, and the model versions.

The job calls the ``multimodal`` application's deployments through its
dataplane (``pipelines.dataplane``), as the HTTP API does: the same image
decoding and limits, the same model code and weights, with their batching and
autoscaling, and no second copy of the models in memory. A record that no
replica answers within ``RECORD_TIMEOUT_S`` fails, and the job goes on.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deployments.downstream import Deadline
from deployments.errors import MaasError
from deployments.settings import limits

APP = "multimodal"
# How long one record may wait for the models (none running, all busy) before it fails.
RECORD_TIMEOUT_S = 300.0
DESCRIPTION_TOKENS = 60  # as POST /v1/multimodal/describe's default max_tokens
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".webm", ".m4a", ".mp4", ".aac"}


@dataclass
class Record:
    id: str
    source: Path | str  # an image path, or the text itself


def file_records(folder: Path, suffixes: set[str], option: str = "--images") -> list[Record]:
    """A record per file under ``folder`` with one of ``suffixes``, sorted by path."""
    if not folder.is_dir():
        raise SystemExit(f"{option}: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    return [Record(id=str(p.relative_to(folder)), source=p) for p in files]


def image_records(folder: Path) -> list[Record]:
    return file_records(folder, IMAGE_SUFFIXES)


def text_records(path: Path) -> list[Record]:
    """Records of a JSONL file; a line that is not a JSON object with a string ``text`` is kept, to fail later."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                record_id = str(item.get("id", number)) if isinstance(item, dict) else str(number)
            except json.JSONDecodeError:
                item, record_id = None, str(number)
            records.append(Record(id=record_id, source=item if isinstance(item, dict) else line))
    return records


class Job:
    """Sends each record through the application's dataplane: the request graph the HTTP API uses."""

    def __init__(self, args: argparse.Namespace):
        from pipelines.dataplane import Dataplane
        from pipelines.multimodal import running_models

        self.args = args
        self.dataplane = Dataplane(running_models(APP), max_concurrent_decodes=os.cpu_count() or 2)
        self.versions: set[str] = set()
        self.limit = asyncio.Semaphore(args.concurrency)

    async def run_image(self, record: Record) -> dict:
        deadline = Deadline(RECORD_TIMEOUT_S)
        raw = await asyncio.to_thread(Path(record.source).read_bytes)
        if self.args.describe:
            return await self.describe(raw, deadline)
        pixels = await self.dataplane.prepare_image("batch", deadline, raw=raw)
        result = await self.dataplane.classify(pixels, self.args.top_k, False, deadline)
        self.versions.add(f"{result.model} {result.version}")
        return {"labels": [{"label": label, "score": score} for label, score in result.labels]}

    async def describe(self, raw: bytes, deadline: Deadline) -> dict:
        image = await self.dataplane.prepare_views("batch", deadline, raw=raw, vision=True, ocr=True)
        described = await self.dataplane.describe(image, DESCRIPTION_TOKENS, deadline)
        looked, last = described.looked, described.last
        for result in (looked.vision, looked.ocr, last):
            self.versions.add(f"{result.model} {result.version}")
        return {
            "description": described.text,
            "finish_reason": last.finish_reason,
            "classes": [{"label": label, "score": score} for label, score in looked.evidence.classes],
            "text": [{"text": line.text, "confidence": round(line.confidence, 4)} for line in looked.ocr.lines],
        }

    async def run_audio(self, record: Record) -> dict:
        from deployments.contracts import TranscriptionRequest

        deadline = Deadline(RECORD_TIMEOUT_S)
        raw = await asyncio.to_thread(Path(record.source).read_bytes)
        audio = await self.dataplane.prepare_audio("batch", deadline, raw=raw)
        transcript = await self.dataplane.transcribe(audio, TranscriptionRequest(audio.samples), deadline)
        self.versions.add(f"{transcript.model} {transcript.version}")
        return {
            "text": transcript.text,
            "language": transcript.language,
            "duration": transcript.duration,
            "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in transcript.segments],
        }

    async def run_text(self, record: Record) -> dict:
        item = record.source
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError("expected a JSON object with a non-empty string field 'text'")
        if len(text) > limits().max_text_chars:
            raise ValueError(f"text is {len(text)} characters; the limit is {limits().max_text_chars}")
        deadline = Deadline(RECORD_TIMEOUT_S)
        if self.args.labels:
            ranking = await self.dataplane.zero_shot(text, self.args.labels, deadline)
            self.versions.add(f"{ranking.model} {ranking.version}")
            return {"labels": [{"label": label, "score": score} for label, score in ranking.labels]}
        embeddings = await self.dataplane.embed([text], deadline)
        self.versions.add(f"{embeddings.model} {embeddings.version}")
        return {"embedding": embeddings.vectors[0].round(6).tolist()}

    async def one(self, record: Record) -> tuple[dict | None, dict | None]:
        """(result, None) or (None, error) for one record; a failing record never stops the job."""
        async with self.limit:
            try:
                work = self.run_image if self.args.images else self.run_audio if self.args.transcribe else self.run_text
                return {"id": record.id, **await work(record)}, None
            except (MaasError, ValueError, OSError) as exc:
                reason = exc.message if isinstance(exc, MaasError) else str(exc)
                return None, {"id": record.id, "error": type(exc).__name__, "reason": reason}

    async def chunk(self, records: list[Record]) -> tuple[list[dict], list[dict]]:
        outcomes = await asyncio.gather(*(self.one(r) for r in records))
        return [r for r, _ in outcomes if r], [e for _, e in outcomes if e]


def write_atomically(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


async def run(args: argparse.Namespace) -> dict:
    if args.images:
        records = image_records(args.images)
    elif args.transcribe:
        records = file_records(args.transcribe, AUDIO_SUFFIXES, "--transcribe")
    else:
        records = text_records(args.texts)
    out: Path = args.out
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "errors").mkdir(parents=True, exist_ok=True)
    chunks = [records[i : i + args.chunk_size] for i in range(0, len(records), args.chunk_size)]
    # A chunk is done when its error file exists: it is renamed into place after the results file.
    done = {int(p.stem.split("-")[1]) for p in (out / "errors").glob("part-*.jsonl")}
    job = Job(args)
    started = time.monotonic()
    processed = failed = 0
    progress = tqdm(total=len(records), unit="rec", desc="batch_infer", file=sys.stdout, mininterval=2)
    progress.update(sum(len(chunks[k]) for k in done if k < len(chunks)))
    for index, chunk in enumerate(chunks):
        if index in done:
            continue
        results, errors = await job.chunk(chunk)
        write_atomically(out / "results" / f"part-{index:05d}.jsonl", results)
        write_atomically(out / "errors" / f"part-{index:05d}.jsonl", errors)
        processed += len(chunk)
        failed += len(errors)
        progress.update(len(chunk))
    progress.close()
    seconds = time.monotonic() - started
    written = sum(1 for p in (out / "results").glob("part-*.jsonl") for _ in p.open())
    errors = sum(1 for p in (out / "errors").glob("part-*.jsonl") for _ in p.open())
    summary = {
        "records": len(records),
        "succeeded": written,
        "failed": errors,
        "resumed_chunks": len(done),
        "processed_this_run": processed,
        "failed_this_run": failed,
        "seconds": round(seconds, 2),
        "records_per_s": round(processed / seconds, 2) if seconds > 0 else None,
        "models": sorted(job.versions),
        "output": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.batch_infer", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    source.add_argument("--texts", type=Path, help="JSONL file: one object with 'text' (and optional 'id') a line")
    source.add_argument("--transcribe", type=Path, help="folder of audio files (searched recursively) to transcribe")
    parser.add_argument("--out", type=Path, required=True, help="output folder; reuse it to resume")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (1-100)")
    parser.add_argument("--labels", nargs="+", help="texts: rank these labels (zero-shot) instead of embedding")
    parser.add_argument(
        "--describe", action="store_true", help="images: describe each from what vision and OCR find in it"
    )
    parser.add_argument("--chunk-size", type=int, default=256, help="records per output part (1-10000)")
    parser.add_argument("--concurrency", type=int, default=16, help="records in flight (1-1024)")
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= limits().max_top_k:
        parser.error(f"--top-k must be between 1 and {limits().max_top_k}")
    if not 1 <= args.chunk_size <= 10_000 or not 1 <= args.concurrency <= 1024:
        parser.error("--chunk-size must be 1-10000 and --concurrency 1-1024")
    if args.labels and (len(args.labels) > limits().max_labels or len(set(args.labels)) != len(args.labels)):
        parser.error(f"--labels takes up to {limits().max_labels} distinct labels")
    if args.describe and not args.images:
        parser.error("--describe describes images: use it with --images")
    if args.texts and not args.texts.is_file():
        parser.error(f"--texts: {args.texts} is not a file")
    return args


def main(argv: list[str] | None = None) -> None:
    import ray
    from ray import serve

    args = parse_args(sys.argv[1:] if argv is None else argv)
    ray.init(address="auto", log_to_driver=False)
    if APP not in serve.status().applications:
        raise SystemExit(f"the {APP!r} application is not running on this cluster; deploy it with `serve deploy`")
    summary = asyncio.run(run(args))
    print(
        f"done: {summary['records']} records, {summary['succeeded']} succeeded, {summary['failed']} failed; "
        f"this run processed {summary['processed_this_run']} in {summary['seconds']} s "
        f"({summary['records_per_s']} records/s), resumed {summary['resumed_chunks']} finished chunks"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
