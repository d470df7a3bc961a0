"""Speech in ``make bench``: Whisper on real speech through the cluster and in-process, and Piper's voice.

1. Word error rate: the five LibriVox clips of Debian's ``pocketsphinx-testdata`` (24.7 s of *Sense and
   Sensibility*) and its spoken commands (five card names, and "go forward ten meters"), each transcribed
   through ``POST /v1/audio/transcriptions`` and by the same model in this process (``WhisperRecognizer``,
   one clip at a time, the upload decoded by the same ``decode_audio``). Serving must change nothing: the
   texts are compared as well as their error rates. Both sides are normalised first (``normalise``: lower
   case, no punctuation, numbers as words, titles spelled out), since Whisper writes "10 meters" and
   "Mr. Dashwood" where the references say "ten meters" and "mister dashwood".
2. Throughput: closed-loop clients (1, 4 and 8) sending the LibriVox clips round-robin for
   ``BENCH_SPEECH_DURATION_S``, against one caller in this process: the audio seconds transcribed per second
   of wall time (how many real-time streams it keeps up with) and each request's real-time factor (its
   latency over its audio's length). The ratio of 8 clients to 1 client is what two replicas on two cores
   give; its target is 1.8.
3. Streaming: for each clip, the time to the first ``transcript.text.delta`` of a streamed transcription
   against the time to the whole answer without streaming. Whisper reads 30 s windows and a window's
   segments come together, so only audio longer than one window can show text early: the five clips joined
   twice (49.5 s, two windows) are measured as well.
4. Synthesis: ``POST /v1/audio/speech`` with one sentence and with several, in WAV and MP3, against Piper's
   own program started by this process and given the same sentences one after another (the replica's work,
   without serving): the time to the first audio byte, the whole request's time, and its real-time factor
   (wall time over seconds of audio returned, decoded from the bytes).

Knobs: ``BENCH_SPEECH_DURATION_S`` (per throughput point, default 20), ``BENCH_SPEECH_CLIENTS`` (default
``1,4,8``), ``BENCH_SPEECH_REPEATS`` (synthesis requests per text and format, medians reported, default 3),
``BENCH_SPEECH_DATA`` (pocketsphinx-testdata's folder, default ``/usr/share/pocketsphinx/test/data``).
"""

import asyncio
import io
import json
import os
import re
import statistics
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks import cpu
from benchmarks.report import _verdict
from benchmarks.wer import word_errors

DATA = Path(os.environ.get("BENCH_SPEECH_DATA", "/usr/share/pocketsphinx/test/data"))
DURATION_S = float(os.environ.get("BENCH_SPEECH_DURATION_S", "20"))
CLIENTS = [int(c) for c in os.environ.get("BENCH_SPEECH_CLIENTS", "1,4,8").split(",")]
REPEATS = int(os.environ.get("BENCH_SPEECH_REPEATS", "3"))
TRANSCRIPTIONS = "/v1/audio/transcriptions"
SPEECH = "/v1/audio/speech"
TARGET_8_OVER_1 = 1.8
"""Audio seconds per second at 8 clients over 1 client: two single-threaded replicas on two cores."""
SETS = {"librivox": "LibriVox read speech", "commands": "spoken commands"}
TEXTS = {
    "one sentence": "The quick brown fox jumps over the lazy dog beside the quiet river bank.",
    "four sentences": (
        "Speech synthesis turns written text into sound. Each sentence is said as soon as it is ready, so a "
        "listener hears the first one while the rest are still being made. Long answers start playing early. "
        "This is the last sentence of the test."
    ),
}
FORMATS = ("wav", "mp3")


# --- the clips ------------------------------------------------------------------------------------------


@dataclass
class Clip:
    name: str
    wav: bytes
    reference: str  # "" where there is none (the joined clip, timed only)
    seconds: float


def _wav(samples: bytes, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples)
    return buffer.getvalue()


def _frames(wav: bytes) -> bytes:
    with wave.open(io.BytesIO(wav)) as reader:
        return reader.readframes(reader.getnframes())


def _transcriptions(path: Path) -> dict[str, str]:
    """A Sphinx transcription file: ``<s> words </s> (clip-id)`` per line."""
    found = {}
    for line in path.read_text().splitlines():
        if match := re.fullmatch(r"\s*<s>(.*?)</s>\s*\((\S+)\)\s*", line):
            found[match.group(2)] = " ".join(match.group(1).split())
    return found


def clips(data: Path = DATA) -> dict[str, list[Clip]]:
    """The clips of each set, with their reference transcripts. ``goforward.raw`` is headerless 16 kHz 16-bit
    mono PCM (as pocketsphinx reads it): it is sent wrapped in a WAV header."""
    if not (data / "librivox" / "transcription").is_file():
        raise FileNotFoundError(
            f"no speech to measure in {data}: install Debian's pocketsphinx-testdata "
            "(apt-get install pocketsphinx-testdata) or set BENCH_SPEECH_DATA"
        )

    sets: dict[str, list[Clip]] = {"librivox": [], "commands": []}
    for name, reference in _transcriptions(data / "librivox" / "transcription").items():
        sets["librivox"].append(clip_of(name, (data / "librivox" / f"{name}.wav").read_bytes(), reference))
    for name, reference in _transcriptions(data / "cards" / "cards.transcription").items():
        sets["commands"].append(clip_of(f"cards/{name}", (data / "cards" / f"{name}.wav").read_bytes(), reference))
    raw = data / "goforward.raw"
    if raw.is_file():
        sets["commands"].append(clip_of("goforward", _wav(raw.read_bytes()), "go forward ten meters"))
    return sets


def joined(librivox: list[Clip], times: int = 2) -> Clip:
    """The clips one after another, ``times`` over: audio longer than one 30 s window."""
    samples = b"".join(_frames(c.wav) for c in librivox) * times
    return clip_of(f"all {len(librivox)} joined, {times}x", _wav(samples))


def clip_of(name: str, wav: bytes, reference: str = "") -> Clip:
    return Clip(name, wav, reference, len(_frames(wav)) / 2 / 16_000)


# --- in-process -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _throughput(latencies: list[float], audio: list[float], seconds: float, errors: int = 0, refused: int = 0):
    rtfs = [latency / length for latency, length in zip(latencies, audio)]
    return {
        "requests": len(latencies),
        "errors": errors,
        "refused": refused,
        "audio_s": sum(audio),
        "seconds": seconds,
        "audio_s_per_s": sum(audio) / seconds if seconds else 0.0,
        "rtf_p50": percentile(rtfs, 50),
        "rtf_p99": percentile(rtfs, 99),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
    }


def transcribe_in_process(recognizer, wav: bytes) -> str:
    """A clip's text from the model in this process, the upload decoded as the ingress decodes it and the
    segments joined as the route joins them."""
    from deployments.audio import decode_audio
    from deployments.contracts import TranscriptionRequest
    from deployments.settings import limits

    audio = decode_audio(wav, limits())
    segments, _ = recognizer.begin(TranscriptionRequest(audio.samples))
    return "".join(segment.text for segment in segments).strip()


def transcripts_in_process(recognizer, sets: dict[str, list[Clip]]) -> dict[str, list[dict]]:
    out = {}
    for name, clip_list in sets.items():
        out[name] = []
        for clip in clip_list:
            began, cpu = time.perf_counter(), time.process_time()
            text = transcribe_in_process(recognizer, clip.wav)
            out[name].append(
                {
                    "clip": clip.name,
                    "text": text,
                    "wall_s": time.perf_counter() - began,
                    "cpu_s": time.process_time() - cpu,
                }
            )
    return out


def throughput_in_process(recognizer, librivox: list[Clip], duration_s: float) -> dict:
    """One caller, one clip at a time, round-robin for ``duration_s``: the single-process reference."""
    latencies, audio = [], []
    start, cpu = time.perf_counter(), time.process_time()
    i = 0
    while time.perf_counter() - start < duration_s:
        clip = librivox[i % len(librivox)]
        began = time.perf_counter()
        transcribe_in_process(recognizer, clip.wav)
        latencies.append(time.perf_counter() - began)
        audio.append(clip.seconds)
        i += 1
    result = _throughput(latencies, audio, time.perf_counter() - start)
    result["cpu_s_per_audio_s"] = (time.process_time() - cpu) / sum(audio)
    return result


def audio_seconds(data: bytes, fmt: str) -> float:
    """Seconds of audio in encoded ``data`` (a WAV streamed with no length in its header included)."""
    import av

    with av.open(io.BytesIO(data), format=fmt) as container:
        return sum(frame.samples / frame.sample_rate for frame in container.decode(audio=0))


def _synthesis_row(text: str, fmt: str, first: list[float], wall: list[float], data: bytes) -> dict:
    seconds = audio_seconds(data, fmt)
    whole = statistics.median(wall)
    return {
        "text": text,
        "format": fmt,
        "requests": len(wall),
        "first_audio_s": statistics.median(first),
        "wall_s": whole,
        "audio_s": seconds,
        "rtf": whole / seconds if seconds else float("nan"),
        "bytes": len(data),
    }


async def _synthesis_in_process(repeats: int) -> list[dict]:
    from deployments.audio import AudioEncoder
    from deployments.synthesizer import PiperProgram, SynthesizerConfig, Voice, sentences

    voice = Voice(SynthesizerConfig())
    program = PiperProgram(voice)
    pause = np.zeros(round(voice.config.sentence_pause_s * voice.sample_rate), np.int16)
    rows = []
    try:
        await program.start()
        await program.say("Ready.")  # the voice loaded, as a replica's is before it serves
        for key, text in TEXTS.items():
            lines = sentences(text, voice.config.max_sentence_chars)
            for fmt in FORMATS:
                first, wall = [], []
                for _ in range(repeats):
                    start, data, at = time.perf_counter(), bytearray(), None
                    encoder = AudioEncoder(fmt, voice.sample_rate)
                    for index, line in enumerate(lines):
                        pcm = await program.say(line)
                        if index < len(lines) - 1:
                            pcm = np.concatenate([pcm, pause])
                        data += encoder.feed(pcm)
                        if at is None and data:
                            at = time.perf_counter() - start
                    data += encoder.finish()
                    wall.append(time.perf_counter() - start)
                    first.append(at if at is not None else wall[-1])
                rows.append(_synthesis_row(key, fmt, first, wall, bytes(data)))
    finally:
        await program.close()
    return rows


def synthesis_in_process(repeats: int = REPEATS) -> list[dict]:
    """Piper's own program, started by this process, saying each text's sentences one after another, encoded
    as each format: the replica's work without serving."""
    return asyncio.run(_synthesis_in_process(repeats))


def measure_in_process(log, duration_s: float = DURATION_S) -> dict:
    """Everything of this section that runs in this process, no Ray: the transcripts, the single caller's
    throughput and Piper's synthesis."""
    from deployments.recognizer import RecognizerConfig, WhisperRecognizer

    sets = clips()
    recognizer = WhisperRecognizer(RecognizerConfig())
    transcribe_in_process(recognizer, sets["commands"][0].wav)  # warm up
    transcripts = transcripts_in_process(recognizer, sets)
    for name, rows in transcripts.items():
        errors = [word_errors(c.reference, r["text"]) for c, r in zip(sets[name], rows)]
        log(f"speech in-process, {name}: WER {sum(e for e, _ in errors) / sum(w for _, w in errors):.1%}")
    throughput = throughput_in_process(recognizer, sets["librivox"], duration_s)
    log(
        f"speech in-process: {throughput['audio_s_per_s']:.2f} audio-s/s, RTF p50 {throughput['rtf_p50']:.2f}, "
        f"{throughput['cpu_s_per_audio_s']:.2f} CPU-s per audio second"
    )
    del recognizer
    synthesis = synthesis_in_process()
    for row in synthesis:
        log(
            f"speech in-process synthesis, {row['text']} {row['format']}: first audio {row['first_audio_s']:.2f} s, "
            f"RTF {row['rtf']:.3f}"
        )
    return {"transcripts": transcripts, "throughput": throughput, "synthesis": synthesis}


# --- the cluster ----------------------------------------------------------------------------------------


def _form(clip: Clip, stream: bool = False) -> dict:
    data = {"model": "asr", "response_format": "json"}
    if stream:
        data["stream"] = "true"
    return {"files": {"file": (f"{clip.name.replace('/', '-')}.wav", clip.wav, "audio/wav")}, "data": data}


def _post_transcription(http: httpx.Client, clip: Clip) -> tuple[str | None, float, str | None]:
    """The text, the seconds the whole answer took, and an error (or None); a refusal is retried after its
    Retry-After, a few times."""
    for _ in range(5):
        began = time.perf_counter()
        response = http.post(TRANSCRIPTIONS, **_form(clip))
        if response.status_code == 503:
            time.sleep(float(response.headers.get("retry-after", "1")))
            continue
        if response.status_code != 200:
            return None, time.perf_counter() - began, f"{response.status_code}: {response.text[:200]}"
        return response.json()["text"], time.perf_counter() - began, None
    return None, 0.0, "503 five times"


def _stream_transcription(http: httpx.Client, clip: Clip) -> tuple[float | None, float, str | None]:
    """Seconds to the first ``transcript.text.delta`` and to ``transcript.text.done``, and the text."""
    began, first, text = time.perf_counter(), None, None
    with http.stream("POST", TRANSCRIPTIONS, **_form(clip, stream=True)) as response:
        if response.status_code != 200:
            response.read()
            return None, time.perf_counter() - began, None
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("type") == "transcript.text.delta" and first is None:
                first = time.perf_counter() - began
            elif event.get("type") == "transcript.text.done":
                text = event["text"]
    return first, time.perf_counter() - began, text


async def _client(http: httpx.AsyncClient, clips_: list[Clip], index: int, until: float, rows: list, counts: dict):
    i = index
    while time.monotonic() < until:
        clip = clips_[i % len(clips_)]
        i += 1
        began = time.perf_counter()
        try:
            response = await http.post(TRANSCRIPTIONS, **_form(clip))
        except httpx.HTTPError:
            counts["errors"] += 1
            continue
        if response.status_code == 503:
            counts["refused"] += 1
            await asyncio.sleep(min(float(response.headers.get("retry-after", "1")), max(0, until - time.monotonic())))
        elif response.status_code != 200:
            counts["errors"] += 1
        else:
            rows.append((time.perf_counter() - began, clip.seconds))


async def _load(base: str, librivox: list[Clip], clients: int, duration_s: float) -> dict:
    rows: list[tuple[float, float]] = []
    counts = {"errors": 0, "refused": 0}
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as http:
        with cpu.Meter() as meter:
            start = time.monotonic()
            await asyncio.gather(
                *(_client(http, librivox, c, start + duration_s, rows, counts) for c in range(clients))
            )
            seconds = time.monotonic() - start  # until the last answer begun in time is done
    result = _throughput([r[0] for r in rows], [r[1] for r in rows], seconds, counts["errors"], counts["refused"])
    result["clients"] = clients
    result["cores"] = meter.cores(seconds)
    return result


def _synthesis_cluster(http: httpx.Client, repeats: int) -> list[dict]:
    rows = []
    for key, text in TEXTS.items():
        for fmt in FORMATS:
            body = {"model": "tts", "voice": "joe", "input": text, "response_format": fmt}
            first, wall, data = [], [], b""
            for _ in range(repeats):
                start, at, parts = time.perf_counter(), None, []
                with http.stream("POST", SPEECH, json=body) as response:
                    response.raise_for_status()
                    for chunk in response.iter_bytes():
                        if chunk and at is None:
                            at = time.perf_counter() - start
                        parts.append(chunk)
                wall.append(time.perf_counter() - start)
                first.append(at if at is not None else wall[-1])
                data = b"".join(parts)
            rows.append(_synthesis_row(key, fmt, first, wall, data))
    return rows


def measure_cluster(base: str, log, duration_s: float = DURATION_S, repeats: int = REPEATS) -> dict:
    """The cluster's transcripts (one at a time), streaming against whole answers, closed-loop clients at each
    of ``CLIENTS``, and synthesis."""
    sets = clips()
    out: dict = {"transcripts": {}, "streaming": []}
    with httpx.Client(base_url=base, timeout=300) as http:
        for clip in sets["commands"][:2]:  # warm up both replicas
            _post_transcription(http, clip)
        for name, clip_list in sets.items():
            out["transcripts"][name] = []
            for clip in clip_list:
                text, seconds, error = _post_transcription(http, clip)
                out["transcripts"][name].append({"clip": clip.name, "text": text, "wall_s": seconds, "error": error})
        for clip in [*sets["librivox"], joined(sets["librivox"])]:
            _, whole, _ = _post_transcription(http, clip)
            first, streamed, _ = _stream_transcription(http, clip)
            out["streaming"].append(
                {
                    "clip": clip.name,
                    "seconds": clip.seconds,
                    "first_text_s": first,
                    "streamed_s": streamed,
                    "whole_s": whole,
                }
            )
            log(
                f"speech streaming, {clip.name} ({clip.seconds:.1f} s): first text "
                f"{first if first is not None else float('nan'):.2f} s, whole answer {whole:.2f} s"
            )
        out["throughput"] = []
        for clients in CLIENTS:
            row = asyncio.run(_load(base, sets["librivox"], clients, duration_s))
            log(
                f"speech c={clients}: {row['audio_s_per_s']:.2f} audio-s/s over {row['requests']} answers, RTF p50 "
                f"{row['rtf_p50']:.2f} p99 {row['rtf_p99']:.2f}, refused {row['refused']}, errors {row['errors']}"
            )
            out["throughput"].append(row)
        for fmt in FORMATS:  # warm up the encoders
            http.post(SPEECH, json={"model": "tts", "voice": "joe", "input": "Ready.", "response_format": fmt})
        out["synthesis"] = _synthesis_cluster(http, repeats)
        for row in out["synthesis"]:
            log(
                f"speech synthesis, {row['text']} {row['format']}: first audio {row['first_audio_s']:.2f} s, "
                f"RTF {row['rtf']:.3f}"
            )
    return out


# --- results and report ---------------------------------------------------------------------------------


def accuracy(sets: dict[str, list[Clip]], in_process: dict, cluster: dict) -> dict:
    """Per set: each clip's reference and both texts, their errors, and the set's word error rates."""
    out = {}
    for name, clip_list in sets.items():
        rows = []
        for clip, mine, served in zip(clip_list, in_process[name], cluster[name]):
            local_errors, words = word_errors(clip.reference, mine["text"])
            served_errors, _ = word_errors(clip.reference, served["text"] or "")
            rows.append(
                {
                    "clip": clip.name,
                    "seconds": clip.seconds,
                    "reference": clip.reference,
                    "words": words,
                    "in_process": mine["text"],
                    "cluster": served["text"],
                    "error": served.get("error"),
                    "errors_in_process": local_errors,
                    "errors_cluster": served_errors,
                    "same_text": mine["text"] == served["text"],
                }
            )
        words = sum(r["words"] for r in rows)
        out[name] = {
            "clips": rows,
            "seconds": sum(r["seconds"] for r in rows),
            "words": words,
            "wer_in_process": sum(r["errors_in_process"] for r in rows) / max(words, 1),
            "wer_cluster": sum(r["errors_cluster"] for r in rows) / max(words, 1),
        }
    return out


def combine(in_process: dict, cluster: dict) -> dict:
    """The ``speech`` key of results.json, from ``measure_in_process`` and ``measure_cluster``."""
    return {
        "duration_s": DURATION_S,
        "repeats": REPEATS,
        "cpus": os.cpu_count(),
        "accuracy": accuracy(clips(), in_process["transcripts"], cluster["transcripts"]),
        "throughput": {"in_process": in_process["throughput"], "cluster": cluster["throughput"]},
        "streaming": cluster["streaming"],
        "synthesis": {"in_process": in_process["synthesis"], "cluster": cluster["synthesis"]},
    }


def headline(speech: dict) -> dict:
    """Audio seconds per second at 8 clients over 1, and the cluster's over the in-process single caller."""
    by_clients = {row["clients"]: row for row in speech["throughput"]["cluster"]}
    one, eight = by_clients.get(1), by_clients.get(8)
    alone = speech["throughput"]["in_process"]["audio_s_per_s"]
    out = {}
    if one and eight and one["audio_s_per_s"]:
        out["audio_s_per_s_8_over_1"] = eight["audio_s_per_s"] / one["audio_s_per_s"]
    if one and alone:
        out["audio_s_per_s_1_over_in_process"] = one["audio_s_per_s"] / alone
    if eight and alone:
        out["audio_s_per_s_8_over_in_process"] = eight["audio_s_per_s"] / alone
    return out


def _cpu_lines(speech: dict) -> list[str]:
    """Cores each part of the stack kept busy at each throughput point, and what that leaves 8 clients."""
    points = [row for row in speech["throughput"]["cluster"] if row.get("cores")]
    if not points:
        return []
    roles = sorted(
        {name for row in points for name in row["cores"]}, key=lambda n: -max(r["cores"].get(n, 0) for r in points)
    )
    lines = [
        "",
        f"**Where the CPU went.** Cores each part kept busy during each point (its CPU seconds over the point's "
        f"wall seconds; this machine has {speech.get('cpus', '?')}), read from `/proc` (`benchmarks/cpu.py`).",
        "",
        "| process | "
        + " | ".join(f"{row['clients']} client{'s' if row['clients'] > 1 else ''}" for row in points)
        + " |",
        "|---|" + "---|" * len(points),
    ]
    for name in roles:
        lines.append(f"| {name} | " + " | ".join(f"{row['cores'].get(name, 0.0):.2f}" for row in points) + " |")
    totals = [sum(row["cores"].values()) for row in points]
    lines.append("| all | " + " | ".join(f"{total:.2f}" for total in totals) + " |")
    one = next((row for row in points if row["clients"] == 1), None)
    if one and speech.get("cpus"):
        busy = sum(one["cores"].values())
        lines += [
            "",
            f"One client already keeps {busy:.2f} cores busy, so {speech['cpus']} cores leave room for at most "
            f"{speech['cpus'] / busy:.2f}× its audio-s/s however the load is spread.",
        ]
    return lines


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} s"


def report(speech: dict) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    ratios = headline(speech)
    clips_all = [row for result in speech["accuracy"].values() for row in result["clips"]]
    same = sum(row["same_text"] for row in clips_all)
    lines = [
        "## Speech",
        "",
        "Whisper base (CTranslate2, int8, one thread, beam 5, language detected) behind "
        f"`POST {TRANSCRIPTIONS}`, and the Piper voice (en_US joe) behind `POST {SPEECH}`, each against the same "
        "model in the benchmark's own process with no serving (`benchmarks/speech.py`). The speech is Debian's "
        "pocketsphinx-testdata: five LibriVox clips of *Sense and Sensibility* and six spoken commands (five "
        'card names, and "go forward ten meters").',
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
    ]
    if "audio_s_per_s_8_over_1" in ratios:
        ratio = ratios["audio_s_per_s_8_over_1"]
        lines.append(
            f"| audio seconds transcribed per second, 8 clients / 1 client | {ratio:.2f} | "
            f">= {TARGET_8_OVER_1} | {_verdict(ratio, TARGET_8_OVER_1)} |"
        )
    lines += [
        f"| transcripts through the cluster equal to the in-process model's | {same} of {len(clips_all)} | all | "
        f"{_verdict(same, len(clips_all))} |",
        "",
        "**Word error rate.** Each clip transcribed once through the cluster and once in-process, one at a time. "
        "WER: word-level edit distance (substitutions, deletions, insertions) over the reference's words, both "
        'sides normalised first: lower case, punctuation removed, numbers as words ("10" is "ten"), '
        '"Mr." as "mister". Serving should change nothing: the texts are compared too.',
        "",
        "| clips | audio | reference words | WER in-process | WER cluster | same text |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in speech["accuracy"].items():
        rows = result["clips"]
        lines.append(
            f"| {SETS.get(name, name)} ({len(rows)}) | {result['seconds']:.1f} s | {result['words']} | "
            f"{result['wer_in_process']:.1%} | {result['wer_cluster']:.1%} | "
            f"{sum(r['same_text'] for r in rows)} of {len(rows)} |"
        )
    lines += [
        "",
        "| clip | audio | reference | heard (cluster) | errors in-process / cluster |",
        "|---|---|---|---|---|",
    ]
    for row in clips_all:
        heard = row["cluster"] if row["cluster"] is not None else f"error {row.get('error')}"
        if not row["same_text"] and row["cluster"] is not None:
            heard += f" (in-process: {row['in_process']})"
        lines.append(
            f"| {row['clip']} | {row['seconds']:.1f} s | {row['reference']} | {heard} | "
            f"{row['errors_in_process']} / {row['errors_cluster']} |"
        )
    alone = speech["throughput"]["in_process"]
    seconds = [row["seconds"] for row in speech["accuracy"].get("librivox", {}).get("clips", [])] or [float("nan")]
    lengths = f"{min(seconds):.0f} to {max(seconds):.0f} s"
    lines += [
        "",
        f"**Throughput.** Closed-loop clients sending the LibriVox clips round-robin for {speech['duration_s']:.0f} "
        "s per point. *Audio-s/s*: seconds of audio transcribed per second of wall time, all clients together "
        "(how many live streams it keeps up with). *RTF*: a request's latency over its audio's length (below 1 "
        f"is faster than real time); every 30 s window costs about the same, so these {lengths} clips cost "
        "more per second than long audio. The in-process caller is one thread, one clip at a time: it used "
        f"{alone.get('cpu_s_per_audio_s', float('nan')):.2f} CPU-s per second of audio.",
        "",
        "| setup | clients | answers | audio-s/s | RTF p50 | RTF p99 | latency p50 | refused (503) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| in-process, one at a time | 1 | {alone['requests']} | {alone['audio_s_per_s']:.2f} | "
        f"{alone['rtf_p50']:.2f} | {alone['rtf_p99']:.2f} | {_s(alone['latency_p50_s'])} | 0 | 0 |",
    ]
    for row in speech["throughput"]["cluster"]:
        lines.append(
            f"| cluster | {row['clients']} | {row['requests']} | {row['audio_s_per_s']:.2f} | "
            f"{row['rtf_p50']:.2f} | {row['rtf_p99']:.2f} | {_s(row['latency_p50_s'])} | {row['refused']} | "
            f"{row['errors']} |"
        )
    if "audio_s_per_s_1_over_in_process" in ratios:
        lines += [
            "",
            f"One client through the cluster gets {ratios['audio_s_per_s_1_over_in_process']:.2f}× the "
            "in-process caller's audio-s/s (the upload, HTTP, proxy, ingress and streaming hops)"
            + (
                f"; 8 clients {ratios['audio_s_per_s_8_over_in_process']:.2f}×, two replicas on two cores."
                if "audio_s_per_s_8_over_in_process" in ratios
                else "."
            ),
        ]
    lines += _cpu_lines(speech)
    lines += [
        "",
        "**Time to first text.** Each clip once with `stream=true` (to the first `transcript.text.delta` event, "
        "and to `transcript.text.done`) and once without (the whole JSON answer), one request at a time. "
        "Whisper decodes 30 s windows and sends a window's segments together, so text comes early only in audio "
        "longer than one window: the last row is the five clips joined twice.",
        "",
        "| clip | audio | first text, streamed | whole, streamed | whole, not streamed |",
        "|---|---|---|---|---|",
    ]
    for row in speech["streaming"]:
        lines.append(
            f"| {row['clip']} | {row['seconds']:.1f} s | {_s(row['first_text_s'])} | "
            f"{_s(row['streamed_s'])} | {_s(row['whole_s'])} |"
        )
    lines += [
        "",
        f"**Synthesis.** Medians of {speech['repeats']} requests per text and format, one at a time. *First "
        "audio*: to the first byte of audio (the first sentence said and encoded); *whole*: to the last byte; "
        "*RTF*: whole over the seconds of audio returned (decoded from the bytes). In-process is Piper's own "
        "program started by the benchmark, given the same sentences one after another and encoded the same "
        "way: the replica's work without serving.",
        "",
        "| text | format | setup | first audio | whole | audio | RTF |",
        "|---|---|---|---|---|---|---|",
    ]
    local = {(row["text"], row["format"]): row for row in speech["synthesis"].get("in_process", [])}
    for served in speech["synthesis"].get("cluster", []):
        for label, row in (("in-process", local.get((served["text"], served["format"]))), ("cluster", served)):
            if row is not None:
                lines.append(
                    f"| {row['text']} | {row['format']} | {label} | {_s(row['first_audio_s'])} | "
                    f"{_s(row['wall_s'])} | {row['audio_s']:.1f} s | {row['rtf']:.3f} |"
                )
    return lines
