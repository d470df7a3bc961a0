"""Audio in and out: decoding uploads into what the recogniser hears, and encoding what the synthesiser says.

Decoding happens once, in the ingress, so a broken or oversized file is answered there with a 4xx and only
16 kHz mono samples (two bytes each) cross to the recognition replica. The decoder is FFmpeg, through PyAV
(the ``av`` wheel that faster-whisper itself decodes with); nothing is written to disk.

Bounded work per audio
----------------------
An upload may not make the ingress decode, allocate or send much more than its limits allow, whatever its
file size:

* its bytes (``Limits.max_audio_bytes``) before anything else;
* its container, from its first bytes (``sniff``): WAV, FLAC, MP3, Ogg (Vorbis, Opus, FLAC), WebM/Matroska,
  MP4/M4A or ADTS AAC, each opened with its own demuxer. FFmpeg is never asked to guess: its guessing
  reaches demuxers such as playlists and concatenation scripts, which open other files by name;
* from the header, before any sample is decoded: the stream's sample rate and channels
  (``max_audio_sample_rate``, ``min_audio_sample_rate``, ``max_audio_channels``) and its stated duration
  (``max_audio_seconds``);
* while decoding, the duration again, as samples come out: a small file can state a short duration and hold
  hours (a VBR header that lies, a stream without one), and decoding stops at the limit, so it never costs
  more than ``max_audio_seconds`` of samples;
* what comes out: silence only, or nothing at all, is refused as empty audio.

Anything FFmpeg raises on a hostile file becomes ``InvalidAudio`` (422). The memory of one decode is at most
``max_audio_seconds`` x 16 kHz x 2 bytes (19 MB at the default 600 s) plus FFmpeg's frame.

Encoding
--------
``AudioEncoder`` turns the synthesiser's 16-bit mono PCM, fed sentence by sentence, into the format a client
asked for, returning what can be sent at once, so speech streams as it is made. ``Tempo`` changes its speed
without changing its pitch (FFmpeg's ``atempo``).
"""

import base64
import binascii
import io
import struct
import time
from dataclasses import dataclass

import numpy as np

from deployments.errors import AudioTooLong, EmptyAudio, InvalidAudio, InvalidInput, PayloadTooLarge, UnsupportedAudio
from deployments.settings import Limits

TARGET_RATE = 16_000
"""What the recogniser hears: Whisper's sample rate, mono."""

DEMUXERS = {
    "wav": "wav",
    "flac": "flac",
    "mp3": "mp3",
    "ogg": "ogg",
    "webm": "matroska",
    "mp4": "mov",
    "aac": "aac",
}
"""The containers accepted, by name, and the FFmpeg demuxer that opens each."""
SUPPORTED = "WAV, FLAC, MP3, Ogg (Vorbis, Opus), WebM, MP4/M4A or AAC"


def sniff(raw: bytes) -> str | None:
    """The container of an audio file, from its first bytes (``DEMUXERS``' names), or None."""
    head = raw[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x03
        return "aac" if layer == 0 else "mp3"  # ADTS frames have layer 0; MPEG audio 1 to 3
    return None


@dataclass
class DecodedAudio:
    """An upload decoded for the recogniser: 16 kHz mono 16-bit samples, and what it was."""

    samples: np.ndarray  # (n,) int16 at TARGET_RATE
    container: str  # sniff()'s name, or "samples" for samples sent as numbers
    codec: str
    sample_rate: int  # of the upload
    channels: int
    size_bytes: int
    seconds: float  # to decode

    @property
    def duration_s(self) -> float:
        return len(self.samples) / TARGET_RATE


def decode_base64_audio(data: str, limits: Limits, field: str | tuple = "file") -> bytes:
    """The bytes of a base64 audio field (a ``data:`` URL prefix is allowed), refusing anything not base64."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    if len(data) > limits.max_audio_bytes * 4 // 3 + 4:
        raise PayloadTooLarge(f"audio is larger than the limit of {limits.max_audio_bytes} bytes", field=field)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"audio is not valid base64: {exc}", field=field) from None


def decode_audio(raw: bytes, limits: Limits, field: str | tuple = "file") -> DecodedAudio:
    """Decode and check an encoded audio file within the limits (see the module docstring); 16 kHz mono out.

    Raises a 4xx error that says what is wrong: empty, too many bytes, not a supported container, a sample
    rate or channel count out of bounds, longer than the limit (stated or decoded), truncated or corrupt.
    """
    import av

    start = time.perf_counter()
    if not raw:
        raise EmptyAudio("audio is empty", field=field)
    if len(raw) > limits.max_audio_bytes:
        raise PayloadTooLarge(f"audio is {len(raw)} bytes; the limit is {limits.max_audio_bytes} bytes", field=field)
    container_name = sniff(raw)
    if container_name is None:
        raise InvalidAudio(f"the file is not audio of a supported format ({SUPPORTED})", field=field)
    try:
        container = av.open(io.BytesIO(raw), format=DEMUXERS[container_name], metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise InvalidAudio(f"the {container_name} file cannot be read: {_describe(exc)}", field=field) from None
    with container:
        if not container.streams.audio:
            raise InvalidAudio(f"the {container_name} file has no audio stream", field=field)
        stream = container.streams.audio[0]
        context = stream.codec_context
        if context is None:  # FFmpeg knows no decoder for it: an unknown codec, or a damaged header
            raise InvalidAudio(f"the {container_name} file cannot be read: its audio codec is unknown", field=field)
        rate, channels = context.sample_rate, context.channels
        if not rate or not channels:  # FFmpeg found no stream parameters: nothing it can decode
            raise InvalidAudio(
                f"the {container_name} file cannot be read: its audio states {rate} Hz and {channels} channels",
                field=field,
            )
        _check_format(rate, channels, limits, field)
        stated = _stated_seconds(stream, container)
        if stated is not None and stated > limits.max_audio_seconds:
            raise AudioTooLong(
                f"the audio is {stated:.0f} s long; the limit is {limits.max_audio_seconds:g} s", field=field
            )
        samples = _decode(container, stream, limits, field)
    if not len(samples) or not samples.any():
        raise EmptyAudio("the audio holds no sound (no samples, or only silence)", field=field)
    return DecodedAudio(samples, container_name, context.name, rate, channels, len(raw), time.perf_counter() - start)


def from_samples(samples: np.ndarray, sample_rate: int, limits: Limits, field: str | tuple = "samples") -> DecodedAudio:
    """Mono float samples in [-1, 1] at ``sample_rate`` (as the Open Inference Protocol sends them), resampled
    to what the recogniser hears, within the same limits as a file."""
    import av

    start = time.perf_counter()
    _check_format(sample_rate, 1, limits, field)
    if len(samples) > limits.max_audio_seconds * sample_rate:
        raise AudioTooLong(
            f"the audio is {len(samples) / sample_rate:.0f} s long; the limit is {limits.max_audio_seconds:g} s",
            field=field,
        )
    if not np.all(np.isfinite(samples)) or np.abs(samples).max(initial=0.0) > 1.0:
        raise InvalidAudio("samples must be finite numbers from -1 to 1", field=field)
    pcm = np.round(samples * 32767).astype(np.int16)
    if sample_rate != TARGET_RATE and len(pcm):
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=TARGET_RATE)
        pcm = np.concatenate(
            [f.to_ndarray().reshape(-1) for f in [*resampler.resample(frame), *resampler.resample(None)]]
        )
    if not len(pcm) or not pcm.any():
        raise EmptyAudio("the audio holds no sound (no samples, or only silence)", field=field)
    return DecodedAudio(pcm, "samples", "pcm_f32", sample_rate, 1, samples.nbytes, time.perf_counter() - start)


def _check_format(rate: int, channels: int, limits: Limits, field) -> None:
    if not limits.min_audio_sample_rate <= rate <= limits.max_audio_sample_rate:
        raise UnsupportedAudio(
            f"the audio's sample rate is {rate} Hz; accepted are {limits.min_audio_sample_rate} to "
            f"{limits.max_audio_sample_rate} Hz",
            field=field,
        )
    if not 1 <= channels <= limits.max_audio_channels:
        raise UnsupportedAudio(
            f"the audio has {channels} channels; accepted are 1 to {limits.max_audio_channels}", field=field
        )


def _stated_seconds(stream, container) -> float | None:
    """The duration the file states (the stream's, else the container's), or None where it states none."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _decode(container, stream, limits: Limits, field) -> np.ndarray:
    """16 kHz mono int16 samples of the stream, refused as soon as they pass the duration limit."""
    import av

    most = int(limits.max_audio_seconds * TARGET_RATE)
    resampler, shape = None, None
    pieces, count = [], 0

    def drain(frame) -> None:
        nonlocal count
        for out in resampler.resample(frame):
            pieces.append(out.to_ndarray().reshape(-1))
            count += out.samples

    try:
        for frame in container.decode(stream):
            _check_format(frame.sample_rate, frame.layout.nb_channels, limits, field)
            # A stream may change its rate or channels midway (files joined end to end): resample each stretch
            # from what it is.
            if (frame.format.name, frame.layout.name, frame.sample_rate) != shape:
                if resampler is not None:
                    drain(None)
                resampler = av.AudioResampler(format="s16", layout="mono", rate=TARGET_RATE)
                shape = (frame.format.name, frame.layout.name, frame.sample_rate)
            drain(frame)
            if count > most:
                raise AudioTooLong(
                    f"the audio decodes to more than the limit of {limits.max_audio_seconds:g} s", field=field
                )
        if resampler is not None:
            drain(None)
    except av.FFmpegError as exc:
        raise InvalidAudio(f"the audio is truncated or corrupt: {_describe(exc)}", field=field) from None
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)


def _describe(exc: Exception) -> str:
    """FFmpeg's reason, without the file name or data it may quote."""
    return getattr(exc, "strerror", None) or type(exc).__name__


# --- out: what the synthesiser says, in the format asked for ---------------------------------------------

OUTPUT_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
"""What ``/v1/audio/speech`` answers in (OpenAI's ``response_format``)."""
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
PCM_RATE = 24_000
"""OpenAI's ``pcm``: raw 16-bit little-endian mono samples at 24 kHz."""
# format -> (muxer, encoder, encoder's sample rate: None keeps the voice's)
_ENCODERS = {
    "mp3": ("mp3", "libmp3lame", None),
    "opus": ("ogg", "libopus", 48_000),
    "aac": ("adts", "aac", None),
    "flac": ("flac", "flac", None),
}


class AudioEncoder:
    """16-bit mono PCM at ``rate``, fed in pieces, encoded as ``fmt``: ``feed`` and ``finish`` return the bytes
    ready to send, so a response can stream as speech is made.

    ``wav`` written as a stream has no length in its header (0xFFFFFFFF, as streamed WAV has: players and
    decoders read to the end); ``whole=True`` holds it back until ``finish`` and writes the real length.
    """

    def __init__(self, fmt: str, rate: int, whole: bool = False):
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; formats: {', '.join(OUTPUT_FORMATS)}")
        self.format, self.rate, self.whole = fmt, rate, whole
        self._held: list[bytes] = []
        self._started = False
        self._resampler = self._container = self._stream = None
        self._sink = _Sink()
        if fmt == "pcm" and rate != PCM_RATE:
            import av

            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_RATE)
        elif fmt in _ENCODERS:
            import av

            muxer, codec, codec_rate = _ENCODERS[fmt]
            self._container = av.open(self._sink, mode="w", format=muxer)
            self._stream = self._container.add_stream(codec, rate=codec_rate or rate, layout="mono")

    def feed(self, pcm: np.ndarray) -> bytes:
        """Encode ``pcm`` ((n,) int16); the bytes ready to send (may be none yet)."""
        if not len(pcm):
            return b""
        if self.format == "wav":
            if self.whole:
                self._held.append(pcm.astype("<i2").tobytes())
                return b""
            head = b"" if self._started else _wav_header(self.rate, 0xFFFFFFFF)
            self._started = True
            return head + pcm.astype("<i2").tobytes()
        if self.format == "pcm":
            if self._resampler is None:
                return pcm.astype("<i2").tobytes()
            return b"".join(
                f.to_ndarray().astype("<i2").tobytes() for f in self._resampler.resample(_frame(pcm, self.rate))
            )
        for packet in self._stream.encode(_frame(pcm, self.rate)):
            self._container.mux(packet)
        return self._sink.drain()

    def finish(self) -> bytes:
        """The rest: what the encoder still held, and the container's trailer."""
        if self.format == "wav":
            data = b"".join(self._held)
            if self.whole or not self._started:
                return _wav_header(self.rate, len(data)) + data
            return b""
        if self.format == "pcm":
            if self._resampler is None:
                return b""
            return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in self._resampler.resample(None))
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.drain()

    def close(self) -> None:
        """Free the encoder without finishing (the client left)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - a half-written stream may refuse its trailer; nothing is sent
                pass


class _Sink:
    """A file-like object FFmpeg writes into and ``drain`` empties. It has no ``seek``, so muxers write for a
    stream (no going back to fill in lengths)."""

    def __init__(self):
        self._buffer = bytearray()

    def write(self, data) -> int:
        self._buffer += data
        return len(data)

    def drain(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _frame(pcm: np.ndarray, rate: int):
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16",
                                       layout="mono")  # fmt: skip
    frame.sample_rate = rate
    return frame


def _wav_header(rate: int, data_bytes: int) -> bytes:
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data_bytes)


class Tempo:
    """Speech at ``speed`` times its pace, its pitch unchanged (FFmpeg's ``atempo``; 0.25 to 4.0)."""

    def __init__(self, speed: float, rate: int):
        import av.filter

        self.rate = rate
        self.graph = av.filter.Graph()
        source = self.graph.add_abuffer(format="s16", sample_rate=rate, layout="mono", time_base=f"1/{rate}")
        last = source
        for factor in _tempo_steps(speed):  # one atempo takes 0.5 to 2.0 without losing quality
            step = self.graph.add("atempo", f"{factor:.6f}")
            last.link_to(step)
            last = step
        sink = self.graph.add("abuffersink")
        last.link_to(sink)
        self.graph.configure()
        self._pts = 0

    def process(self, pcm: np.ndarray) -> np.ndarray:
        frame = _frame(pcm, self.rate)
        frame.pts, self._pts = self._pts, self._pts + len(pcm)
        self.graph.push(frame)
        return self._pull()

    def flush(self) -> np.ndarray:
        self.graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        import av

        out = []
        while True:
            try:
                out.append(self.graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                break
        return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)


def _tempo_steps(speed: float) -> list[float]:
    steps = []
    while speed > 2.0:
        steps.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        steps.append(0.5)
        speed /= 0.5
    return [*steps, speed]
