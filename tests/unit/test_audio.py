"""Audio in and out (``deployments.audio``): uploads decoded within the limits, speech encoded as asked.

The speech is a LibriVox reader from Debian's pocketsphinx-testdata (the ``librivox`` fixture); every other
container, and every hostile file, is made here: with PyAV's encoders, or byte by byte with ``struct``.
"""

import base64
import io
import struct
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from deployments import audio
from deployments.audio import (
    MEDIA_TYPES,
    OUTPUT_FORMATS,
    PCM_RATE,
    TARGET_RATE,
    AudioEncoder,
    Tempo,
    decode_audio,
    decode_base64_audio,
    from_samples,
    sniff,
)
from deployments.errors import (
    AudioTooLong,
    EmptyAudio,
    InvalidAudio,
    InvalidInput,
    MaasError,
    PayloadTooLarge,
    UnsupportedAudio,
)
from deployments.settings import Limits

LIMITS = Limits()
SECRET = b"Patient Jane Roe, card 4111 1111 1111 1111, token SECRET-7f3a9c. "
"""Text a hostile or mistaken upload carries: no error message may quote it."""
VOICE_RATE = 22_050  # the packaged Piper voice's


# --- what is decoded and encoded here ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech_wav(librivox) -> bytes:
    """2.99 s of a LibriVox reader saying "he was not an ill disposed young man": 16 kHz mono WAV."""
    (clip,) = [clip for clip in librivox if clip.name.endswith("-0880")]
    return clip.wav


@pytest.fixture(scope="module")
def speech(speech_wav) -> np.ndarray:
    with wave.open(io.BytesIO(speech_wav)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (16_000, 1, 2)
        return np.frombuffer(reader.readframes(reader.getnframes()), "<i2").astype(np.int16)


def resampled(pcm: np.ndarray, rate: int, to_rate: int, layout: str = "mono") -> av.AudioFrame:
    """Mono int16 samples at ``rate`` as one frame at ``to_rate`` with ``layout``'s channels."""
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="s16", layout=layout, rate=to_rate)
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    merged = np.concatenate([f.to_ndarray() for f in frames], axis=1)
    out = av.AudioFrame.from_ndarray(merged, format="s16", layout=layout)
    out.sample_rate = to_rate
    return out


def encoded(pcm: np.ndarray, rate: int, muxer: str, codec: str, to_rate: int, layout: str = "mono",
            bit_rate: int | None = None, **muxer_options: str) -> bytes:  # fmt: skip
    """Mono int16 samples at ``rate``, encoded by FFmpeg as ``codec`` in ``muxer`` at ``to_rate``, ``layout``."""
    out = io.BytesIO()
    with av.open(out, "w", format=muxer, options=muxer_options) as container:
        stream = container.add_stream(codec, rate=to_rate, layout=layout)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "-2"}  # FFmpeg's own Vorbis encoder is "experimental"
        if bit_rate:
            stream.bit_rate = bit_rate
        for packet in [*stream.encode(resampled(pcm, rate, to_rate, layout)), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


def wav_file(samples: np.ndarray, rate: int, channels: int | None = None) -> bytes:
    """A PCM WAV file written field by field: (n,) or (n, channels) int16 samples, at any rate; ``channels``
    overrides what the header states."""
    samples = samples[:, None] if samples.ndim == 1 else samples
    channels = samples.shape[1] if channels is None else channels
    data = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(seconds: float, rate: int = 16_000, hz: float = 440.0, level: int = 8000) -> np.ndarray:
    return (np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate) * level).astype(np.int16)


def likeness(reference: np.ndarray, heard: np.ndarray, most_delay: int = 2048) -> float:
    """Normalised correlation of two recordings of the same sound, at the delay (up to ``most_delay`` samples)
    that a codec may add: 1.0 for the same samples, near 0 for unrelated sound."""
    ref, out = reference.astype(np.float64), heard.astype(np.float64)
    n = len(ref) + len(out)
    correlation = np.fft.irfft(np.fft.rfft(out, n) * np.conj(np.fft.rfft(ref, n)), n)[: most_delay + 1]
    delay = int(np.argmax(correlation))
    a = ref[: len(out) - delay]
    b = out[delay : delay + len(a)]
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def flac_of_constant_frames(frames: int, stated_samples: int = 0, block: int = 65_535, rate: int = 16_000,
                            frame_rates: list[bytes] | None = None) -> bytes:  # fmt: skip
    """A FLAC file of 16-bit mono frames of ``block`` samples that each hold one constant value (a CONSTANT
    subframe: 15 bytes for 4 s of sound, so 12 KB decode to an hour). STREAMINFO states ``stated_samples``
    (0: unknown). ``frame_rates``: each frame's sample-rate code bits and trailing bytes (default: the stream's).
    """
    info = struct.pack(">HH", block, block) + bytes(6)
    info += ((rate << 44) | (0 << 41) | (15 << 36) | stated_samples).to_bytes(8, "big") + bytes(16)
    out = [b"fLaC", bytes([0x80]) + len(info).to_bytes(3, "big") + info]
    for number in range(frames):
        code, extra = frame_rates[number] if frame_rates else (0, b"")
        # sync, block size from the header's end, sample rate; mono, 16 bits; frame number (UTF-8 coded)
        head = b"\xff\xf8" + bytes([0x70 | code, 0x08]) + chr(number).encode() + struct.pack(">H", block - 1) + extra
        body = head + bytes([crc8(head)]) + b"\x00" + struct.pack(">h", 1000)
        out.append(body + struct.pack(">H", crc16(body)))
    return b"".join(out)


def flac_holding(seconds: float, stated_seconds: float = 0.0) -> bytes:
    return flac_of_constant_frames(-(-round(seconds * 16_000) // 65_535), round(stated_seconds * 16_000))


# name: (muxer, codec, rate, what sniff() calls it, FFmpeg's decoder)
UPLOADS = {
    "flac": ("flac", "flac", 44_100, "flac", "flac"),
    "ogg-opus": ("ogg", "libopus", 48_000, "ogg", "opus"),
    "ogg-vorbis": ("ogg", "vorbis", 44_100, "ogg", "vorbis"),
    "mp3": ("mp3", "libmp3lame", 44_100, "mp3", "mp3float"),
    "webm": ("webm", "libopus", 48_000, "webm", "opus"),
    "m4a": ("ipod", "aac", 44_100, "mp4", "aac"),
    "adts": ("adts", "aac", 44_100, "aac", "aac"),
}


@pytest.fixture(scope="module")
def uploads(speech) -> dict[str, bytes]:
    """The speech in each container, resampled to the container's rate, in stereo."""
    return {name: encoded(speech, 16_000, muxer, codec, rate, "stereo")
            for name, (muxer, codec, rate, _, _) in UPLOADS.items()}  # fmt: skip


# --- the same speech, whatever its container -------------------------------------------------------------------


@pytest.mark.parametrize("name", UPLOADS)
def test_the_same_speech_decodes_alike_from_every_container(name, uploads, speech):
    _, _, rate, container, codec = UPLOADS[name]
    raw = uploads[name]
    assert sniff(raw) == container
    decoded = decode_audio(raw, LIMITS)
    assert (decoded.container, decoded.codec, decoded.sample_rate, decoded.channels) == (container, codec, rate, 2)
    assert decoded.samples.dtype == np.int16 and decoded.samples.ndim == 1
    assert decoded.duration_s == pytest.approx(len(speech) / TARGET_RATE, abs=0.04)  # AAC adds 1024 samples
    assert likeness(speech, decoded.samples) > 0.95  # the same speech, at 16 kHz (unrelated sound: about 0)
    assert decoded.size_bytes == len(raw) and 0 < decoded.seconds < 1


def test_a_16khz_mono_wav_is_decoded_sample_for_sample(speech_wav, speech):
    decoded = decode_audio(speech_wav, LIMITS)
    assert (decoded.container, decoded.codec, decoded.sample_rate, decoded.channels) == ("wav", "pcm_s16le", 16_000, 1)
    np.testing.assert_array_equal(decoded.samples, speech)
    assert decoded.duration_s == pytest.approx(2.99)


def test_likeness_tells_the_speech_from_other_speech(librivox, speech):
    """The check above would pass for any audio if ``likeness`` could not tell two recordings apart."""
    other = next(clip for clip in librivox if clip.name.endswith("-0890"))
    assert likeness(speech, decode_audio(other.wav, LIMITS).samples) < 0.3


# --- what is not audio, or is broken ----------------------------------------------------------------------------


def image(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, fmt)
    return out.getvalue()


NOT_AUDIO = {
    "random-bytes": lambda: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "text": lambda: SECRET * 50,
    "utf16-text": lambda: "\ufeff".encode("utf-16-le") + SECRET.decode().encode("utf-16-le") * 50,
    "png": lambda: image("PNG"),
    "jpeg": lambda: image("JPEG"),
    "gif": lambda: image("GIF"),
    "webp": lambda: image("WEBP"),  # RIFF, but not WAVE
    "pdf": lambda: b"%PDF-1.7\n" + SECRET * 20,
}


@pytest.mark.parametrize("name", NOT_AUDIO)
def test_bytes_that_are_not_audio_are_refused_without_quoting_them(name):
    raw = NOT_AUDIO[name]()
    with pytest.raises(InvalidAudio) as refused:
        decode_audio(raw, LIMITS)
    assert refused.value.status_code == 422 and refused.value.error_type == "invalid_audio"
    assert "not audio of a supported format" in refused.value.message or "cannot be read" in refused.value.message
    assert "SECRET" not in refused.value.message and "Jane" not in refused.value.message
    assert refused.value.detail()[0]["loc"] == ["body", "file"]


@pytest.mark.parametrize("name", ["random-bytes", "text", "png", "jpeg", "gif", "webp", "pdf"])
def test_sniff_recognises_no_audio_in_other_files(name):
    assert sniff(NOT_AUDIO[name]()) is None


def halved(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def flipped(raw: bytes) -> bytes:
    """Every 50th byte after the first 200 inverted: the header intact, the coded audio damaged."""
    data = bytearray(raw)
    for index in range(200, len(data), 50):
        data[index] ^= 0xFF
    return bytes(data)


BROKEN = {
    # a container's first bytes, then text
    "flac-magic-then-text": lambda uploads: b"fLaC" + SECRET * 20,
    "ogg-magic-then-text": lambda uploads: b"OggS" + SECRET * 20,
    "id3-then-text": lambda uploads: b"ID3\x03\x00\x00\x00\x00\x00\x00" + SECRET * 20,
    "wave-header-then-text": lambda uploads: b"RIFF\x00\x10\x00\x00WAVE" + SECRET * 20,
    "matroska-magic-then-text": lambda uploads: b"\x1a\x45\xdf\xa3" + SECRET * 20,
    "mp4-ftyp-then-text": lambda uploads: b"\x00\x00\x00\x20ftypM4A " + SECRET * 20,
    "mp3-sync-then-text": lambda uploads: b"\xff\xfb\x90\x00" + SECRET * 20,
    "adts-sync-then-text": lambda uploads: b"\xff\xf1\x50\x80" + SECRET * 20,
    # real files, cut short or damaged
    "flac-first-half": lambda uploads: halved(uploads["flac"]),
    "m4a-first-half": lambda uploads: halved(uploads["m4a"]),
    "adts-first-half": lambda uploads: halved(uploads["adts"]),
    "ogg-first-100-bytes": lambda uploads: uploads["ogg-opus"][:100],
    "webm-first-100-bytes": lambda uploads: uploads["webm"][:100],
    "adts-first-100-bytes": lambda uploads: uploads["adts"][:100],
    "flac-damaged": lambda uploads: flipped(uploads["flac"]),
    "mp3-damaged": lambda uploads: flipped(uploads["mp3"]),
    "m4a-damaged": lambda uploads: flipped(uploads["m4a"]),
}


@pytest.mark.parametrize("name", BROKEN)
def test_truncated_or_corrupt_files_are_invalid_audio(name, uploads):
    """Each starts as a supported container does, so FFmpeg's demuxer reads it: what it finds is reported as the
    file being unreadable, truncated or corrupt (422), never as something the file does not say."""
    with pytest.raises(InvalidAudio) as refused:
        decode_audio(BROKEN[name](uploads), LIMITS, field="audio")
    message = refused.value.message
    assert "cannot be read" in message or "truncated or corrupt" in message
    assert "SECRET" not in message and "Jane" not in message and len(message) < 200
    assert refused.value.detail()[0]["loc"] == ["body", "audio"]


def test_a_video_without_sound_is_refused_as_having_no_audio_stream():
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(InvalidAudio, match="the mp4 file has no audio stream"):
        decode_audio(out.getvalue(), LIMITS)


# --- limits --------------------------------------------------------------------------------------------------------


def test_more_bytes_than_the_limit_are_refused_before_anything_is_read(speech_wav, monkeypatch):
    limits = Limits(max_audio_bytes=10_000)
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: pytest.fail("the file was opened"))
    for raw in (speech_wav, SECRET * 200):  # audio or not: the size alone answers
        with pytest.raises(PayloadTooLarge) as refused:
            decode_audio(raw, limits)
        assert refused.value.status_code == 413
        assert refused.value.message == f"audio is {len(raw)} bytes; the limit is 10000 bytes"


@pytest.mark.parametrize("rate", [4000, 7999, 192_001, 384_000])
def test_a_sample_rate_out_of_bounds_is_unsupported(rate):
    with pytest.raises(UnsupportedAudio) as refused:
        decode_audio(wav_file(tone(0.5, rate), rate), LIMITS)
    assert refused.value.status_code == 422
    assert refused.value.message == f"the audio's sample rate is {rate} Hz; accepted are 8000 to 192000 Hz"


@pytest.mark.parametrize("rate", [8000, 192_000])
def test_the_bounds_of_the_sample_rate_are_accepted(rate):
    decoded = decode_audio(wav_file(tone(0.5, rate), rate), LIMITS)
    assert decoded.sample_rate == rate and decoded.duration_s == pytest.approx(0.5, abs=0.002)


def test_the_sample_rate_bounds_are_the_limits_own(uploads):
    with pytest.raises(UnsupportedAudio, match="44100 Hz; accepted are 8000 to 32000 Hz"):
        decode_audio(uploads["flac"], Limits(max_audio_sample_rate=32_000))
    with pytest.raises(UnsupportedAudio, match="8000 Hz; accepted are 16000 to 192000 Hz"):
        decode_audio(wav_file(tone(0.5, 8000), 8000), Limits(min_audio_sample_rate=16_000))


def test_more_channels_than_allowed_are_unsupported_and_the_rest_mixed_to_mono(uploads):
    sound = tone(0.5)
    with pytest.raises(UnsupportedAudio, match="the audio has 9 channels; accepted are 1 to 8"):
        decode_audio(wav_file(np.repeat(sound[:, None], 9, axis=1), 16_000), LIMITS)
    eight = decode_audio(wav_file(np.repeat(sound[:, None], 8, axis=1), 16_000), LIMITS)
    assert eight.channels == 8 and eight.samples.ndim == 1 and eight.duration_s == 0.5
    assert likeness(sound, eight.samples) > 0.99
    with pytest.raises(UnsupportedAudio, match="the audio has 2 channels; accepted are 1 to 1"):
        decode_audio(uploads["flac"], Limits(max_audio_channels=1))


def test_a_codec_ffmpeg_cannot_decode_is_refused_as_a_client_error():
    """A WAV file whose format tag (0x1234) names no codec FFmpeg knows: its stream has no decoder."""
    raw = bytearray(wav_file(tone(0.5), 16_000))
    raw[20:22] = struct.pack("<H", 0x1234)
    with pytest.raises((InvalidAudio, UnsupportedAudio)) as refused:
        decode_audio(bytes(raw), LIMITS)
    assert refused.value.status_code == 422
    assert any(word in refused.value.message for word in ("codec", "format", "cannot be read"))


def test_a_wav_header_that_states_no_channels_is_refused():
    with pytest.raises(InvalidInput) as refused:  # unsupported (0 channels) or unreadable: a 422 either way
        decode_audio(wav_file(tone(0.5), 16_000, channels=0), LIMITS)
    assert refused.value.status_code == 422 and "0 channels" in refused.value.message


def test_a_file_that_states_hours_is_refused_from_its_header_without_decoding(monkeypatch):
    """A 64 KB FLAC whose STREAMINFO states (and whose frames hold) 5 hours: refused before any sample is
    decoded, in about a millisecond."""
    raw = flac_holding(5 * 3600, stated_seconds=5 * 3600)
    assert len(raw) < 100_000
    decoded = []
    monkeypatch.setattr(audio, "_decode", lambda *args: decoded.append(1))
    start = time.perf_counter()
    with pytest.raises(AudioTooLong) as refused:
        decode_audio(raw, LIMITS)
    assert time.perf_counter() - start < 0.5
    assert refused.value.status_code == 413
    assert refused.value.message == "the audio is 18000 s long; the limit is 600 s"
    assert not decoded


def adts_guessed_short(speech_seconds: int) -> bytes:
    """An ADTS stream (no length anywhere) whose first second is coded at 64 kbit/s and the rest at 8: FFmpeg
    estimates its duration from the bit rate it measures at the start, 43 s for 61 s."""
    loud = encoded(tone(1, 8000), 8000, "adts", "aac", 8000, bit_rate=64_000)
    quiet = encoded(tone(speech_seconds, 8000), 8000, "adts", "aac", 8000, bit_rate=8000)
    return loud + quiet


@pytest.mark.parametrize(
    "make, stated",
    [
        pytest.param(lambda: flac_holding(3600), None, id="flac-that-states-nothing-holds-an-hour"),
        pytest.param(lambda: flac_holding(120, stated_seconds=5), 5.0, id="flac-that-states-5s-holds-120s"),
        pytest.param(lambda: adts_guessed_short(60), (40, 50), id="adts-guessed-43s-holds-61s"),
    ],
)
def test_audio_that_decodes_past_the_limit_is_refused_once_it_passes_it(make, stated):
    raw = make()
    with av.open(io.BytesIO(raw), format=audio.DEMUXERS[sniff(raw)]) as container:
        said = audio._stated_seconds(container.streams.audio[0], container)
    if isinstance(stated, tuple):
        assert stated[0] < said < stated[1]  # the premise: what is stated passes the limit
    else:
        assert said == stated
    start = time.perf_counter()
    with pytest.raises(AudioTooLong) as refused:
        decode_audio(raw, Limits(max_audio_seconds=50))
    assert refused.value.message == "the audio decodes to more than the limit of 50 s"
    assert time.perf_counter() - start < 1.0  # 50 s of it decoded, not the hour


PEAK_MEMORY = textwrap.dedent(
    """
    import re, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails here, not on the machine
    from deployments.audio import decode_audio
    from deployments.errors import AudioTooLong
    from deployments.settings import Limits

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    raw = open(sys.argv[1], "rb").read()
    before = kib("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark here
    except OSError:
        pass
    try:
        decode_audio(raw, Limits())
        print("decoded")
    except AudioTooLong:
        print("refused")
    print((kib("VmHWM") - before) / 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_decoding_a_small_file_of_hours_takes_bounded_memory(tmp_path):
    """37 KB of FLAC that states nothing and holds 3 hours: refused at the 600 s limit, with about 20 MB at the
    peak (600 s of 16 kHz int16 is 19 MB). Decoding it all would take 345 MB, twice that to join the pieces."""
    path = tmp_path / "hours.flac"
    path.write_bytes(flac_holding(3 * 3600))
    assert path.stat().st_size < 40_000
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], capture_output=True, text=True,
                            timeout=60, cwd=repo)  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome, peak_mb = result.stdout.split()
    assert outcome == "refused"
    assert float(peak_mb) < 60


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: b"", id="no-bytes"),
        pytest.param(lambda: wav_file(np.zeros(0, np.int16), 16_000), id="wav-without-samples"),
        pytest.param(lambda: wav_file(np.zeros(32_000, np.int16), 16_000), id="wav-of-silence"),
        pytest.param(lambda: encoded(np.zeros(32_000, np.int16), 16_000, "flac", "flac", 44_100), id="flac-of-silence"),
        pytest.param(lambda: wav_file(np.zeros((16_000, 2), np.int16), 16_000), id="stereo-silence"),
    ],
)
def test_silence_or_nothing_is_empty_audio(make):
    with pytest.raises(EmptyAudio) as refused:
        decode_audio(make(), LIMITS)
    assert refused.value.status_code == 422 and refused.value.error_type == "empty_audio"
    assert "no sound" in refused.value.message or "empty" in refused.value.message


def test_a_sample_rate_that_drops_out_of_bounds_midway_is_unsupported():
    """FLAC frames carry their own sample rate: three at 16 kHz, then three that say 1 kHz."""
    rates = [(0x5, b"")] * 3 + [(0xC, b"\x01")] * 3  # 0101: 16 kHz; 1100: kHz in the byte after the header
    raw = flac_of_constant_frames(6, block=4096, frame_rates=rates)
    with pytest.raises(UnsupportedAudio, match="sample rate is 1000 Hz; accepted are 8000 to 192000 Hz"):
        decode_audio(raw, LIMITS)


@pytest.mark.parametrize("muxer, codec, rate", [("mp3", "libmp3lame", 8000), ("adts", "aac", 16_000)])
def test_two_files_of_different_formats_joined_end_to_end_are_heard_or_refused_as_a_client_error(muxer, codec, rate):
    """``cat a.mp3 b.mp3`` is a common way to join recordings: here 2 s of 8 or 16 kHz mono, then 2 s of
    44.1 kHz stereo. Either both halves are heard (4 s), or the upload is refused with a 4xx; never a server
    error."""
    options = {"write_xing": "0"} if muxer == "mp3" else {}
    first = encoded(tone(2), 16_000, muxer, codec, rate, "mono", **options)
    second = encoded(tone(2), 16_000, muxer, codec, 44_100, "stereo", **options)
    try:
        decoded = decode_audio(first + second, LIMITS)
    except MaasError as refused:
        assert 400 <= refused.status_code < 500
    else:
        assert decoded.duration_s == pytest.approx(4.0, abs=0.2)


# --- base64 -------------------------------------------------------------------------------------------------------


def test_base64_audio_is_read_with_or_without_a_data_url(speech_wav):
    data = base64.b64encode(speech_wav).decode()
    assert decode_base64_audio(data, LIMITS) == speech_wav
    assert decode_base64_audio("data:audio/wav;base64," + data, LIMITS) == speech_wav


def test_base64_audio_over_the_limit_is_413_before_decoding():
    with pytest.raises(PayloadTooLarge, match="larger than the limit of 1000 bytes") as refused:
        decode_base64_audio("QUFB" * 400, Limits(max_audio_bytes=1000), field="audio")
    assert refused.value.status_code == 413 and refused.value.detail()[0]["loc"] == ["body", "audio"]


@pytest.mark.parametrize("data", ["SECRET-7f3a9c!!", "U0VDUkVUL", "SECRET-7f3a9c==AAAA"])
def test_what_is_not_base64_is_refused_without_quoting_it(data):
    with pytest.raises(InvalidInput, match="audio is not valid base64") as refused:
        decode_base64_audio(data, LIMITS)
    assert refused.value.status_code == 422 and "SECRET" not in refused.value.message


# --- samples sent as numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16_000, 22_050, 44_100, 48_000])
def test_samples_are_resampled_to_16khz_keeping_their_duration(rate, speech):
    source = resampled(speech, 16_000, rate).to_ndarray().reshape(-1) / 32768.0
    decoded = from_samples(source, rate, LIMITS)
    assert (decoded.container, decoded.sample_rate, decoded.channels) == ("samples", rate, 1)
    assert decoded.samples.dtype == np.int16 and decoded.samples.ndim == 1
    assert decoded.duration_s == pytest.approx(len(source) / rate, abs=0.005)
    assert likeness(speech, decoded.samples) > (0.999 if rate >= 16_000 else 0.9)  # 8 kHz lost the top half


def test_16khz_samples_become_the_same_int16_samples(speech):
    decoded = from_samples(speech / 32767.0, 16_000, LIMITS)
    assert np.abs(decoded.samples.astype(int) - speech).max() <= 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1.01, -1.5, 40.0])
def test_samples_that_are_not_finite_or_out_of_range_are_refused(bad):
    samples = np.sin(np.arange(16_000) / 10).astype(np.float32) * 0.5
    samples[1234] = bad
    with pytest.raises(InvalidAudio, match="samples must be finite numbers from -1 to 1") as refused:
        from_samples(samples, 16_000, LIMITS)
    assert refused.value.detail()[0]["loc"] == ["body", "samples"]


def test_more_samples_than_the_duration_limit_are_refused():
    limits = Limits(max_audio_seconds=2)
    assert from_samples(np.full(32_000, 0.1), 16_000, limits).duration_s == 2.0
    with pytest.raises(AudioTooLong, match="the limit is 2 s") as refused:
        from_samples(np.full(32_001, 0.1), 16_000, limits)
    assert refused.value.status_code == 413
    with pytest.raises(AudioTooLong, match="the audio is 3 s long; the limit is 2 s"):
        from_samples(np.full(24_000, 0.1), 8000, limits)


@pytest.mark.parametrize("rate", [4000, 200_000])
def test_samples_at_a_rate_out_of_bounds_are_unsupported(rate):
    with pytest.raises(UnsupportedAudio, match=f"sample rate is {rate} Hz"):
        from_samples(np.full(rate, 0.1), rate, LIMITS)


@pytest.mark.parametrize("samples", [np.zeros(0), np.zeros(16_000), np.full(16_000, 1e-6)])
def test_no_samples_or_silent_ones_are_empty_audio(samples):
    with pytest.raises(EmptyAudio):
        from_samples(samples, 16_000, LIMITS)


# --- out: encoded speech ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voice_speech(speech) -> np.ndarray:
    """The speech at the packaged voice's rate, as the synthesiser hands it to the encoder."""
    return resampled(speech, 16_000, VOICE_RATE).to_ndarray().reshape(-1)


def encode_in_pieces(fmt: str, pcm: np.ndarray, pieces: int = 5, **options) -> tuple[list[bytes], bytes]:
    encoder = AudioEncoder(fmt, VOICE_RATE, **options)
    sent = [encoder.feed(piece) for piece in np.array_split(pcm, pieces)]
    return sent, encoder.finish()


# format: (what sniff() calls it, the codec FFmpeg decodes it with)
ENCODED = {"mp3": ("mp3", "mp3float"), "opus": ("ogg", "opus"), "aac": ("aac", "aac"), "flac": ("flac", "flac"),
           "wav": ("wav", "pcm_s16le"), "pcm": (None, None)}  # fmt: skip


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_every_output_format_decodes_back_to_the_same_speech(fmt, voice_speech, speech):
    sent, last = encode_in_pieces(fmt, voice_speech)
    data = b"".join(sent) + last
    assert sniff(data) == ENCODED[fmt][0] and fmt in MEDIA_TYPES
    assert sum(len(piece) for piece in sent) > 1000  # speech streams before the encoder is finished
    if fmt == "pcm":
        assert len(data) % 2 == 0
        assert len(data) / 2 / PCM_RATE == pytest.approx(len(voice_speech) / VOICE_RATE, abs=0.005)
        data = wav_file(np.frombuffer(data, "<i2"), PCM_RATE)
    decoded = decode_audio(data, LIMITS)
    assert decoded.codec == (ENCODED[fmt][1] or "pcm_s16le")
    assert decoded.duration_s == pytest.approx(len(voice_speech) / VOICE_RATE, abs=0.1)  # MP3 and AAC pad ~70 ms
    assert likeness(speech, decoded.samples) > 0.95


def test_pcm_is_24khz_16_bit_little_endian_samples(speech):
    at_24k = resampled(speech, 16_000, PCM_RATE).to_ndarray().reshape(-1)
    encoder = AudioEncoder("pcm", PCM_RATE)
    assert encoder.feed(at_24k) + encoder.finish() == at_24k.astype("<i2").tobytes()  # already 24 kHz: as it is
    sent, last = encode_in_pieces("pcm", resampled(speech, 16_000, VOICE_RATE).to_ndarray().reshape(-1))
    heard = np.frombuffer(b"".join(sent) + last, "<i2")
    assert likeness(at_24k, heard) > 0.99


def test_streamed_wav_states_no_length_and_whole_wav_its_real_length(voice_speech):
    sent, last = encode_in_pieces("wav", voice_speech)
    assert sent[0][:4] == b"RIFF" and sent[0][8:16] == b"WAVEfmt " and last == b""
    assert struct.unpack("<I", sent[0][4:8])[0] == 0xFFFFFFFF
    assert sent[0][36:40] == b"data" and struct.unpack("<I", sent[0][40:44])[0] == 0xFFFFFFFF
    assert all(piece[:4] != b"RIFF" for piece in sent[1:])  # one header, then samples
    assert b"".join(sent)[44:] == voice_speech.astype("<i2").tobytes()

    sent, last = encode_in_pieces("wav", voice_speech, whole=True)
    assert sent == [b""] * 5
    size = len(voice_speech) * 2
    assert struct.unpack("<I", last[4:8])[0] == 36 + size and struct.unpack("<I", last[40:44])[0] == size
    assert len(last) == 44 + size
    with wave.open(io.BytesIO(last)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (VOICE_RATE, 1, 2)
        assert reader.readframes(reader.getnframes()) == voice_speech.astype("<i2").tobytes()


def test_a_wav_of_nothing_is_still_a_wav_file():
    encoder = AudioEncoder("wav", VOICE_RATE)
    assert encoder.feed(np.zeros(0, np.int16)) == b""
    with wave.open(io.BytesIO(encoder.finish())) as reader:
        assert reader.getnframes() == 0 and reader.getframerate() == VOICE_RATE


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_an_encoder_closed_halfway_raises_nothing(fmt, voice_speech):
    encoder = AudioEncoder(fmt, VOICE_RATE)
    encoder.feed(voice_speech[:10_000])
    encoder.close()


def test_an_unknown_output_format_is_refused_with_the_formats():
    with pytest.raises(ValueError, match="unknown audio format 'ogg'; formats: mp3, opus, aac, flac, wav, pcm"):
        AudioEncoder("ogg", VOICE_RATE)


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * rate / len(pcm))


@pytest.mark.parametrize("speed", [2.0, 0.5, 4.0, 0.25, 1.25])
def test_tempo_changes_the_duration_not_the_pitch(speed):
    sound = tone(3.0, VOICE_RATE, hz=300)
    tempo = Tempo(speed, VOICE_RATE)
    out = np.concatenate([*(tempo.process(piece) for piece in np.array_split(sound, 6)), tempo.flush()])
    assert out.dtype == np.int16
    assert len(out) / VOICE_RATE == pytest.approx(3.0 / speed, rel=0.02)
    assert dominant_hz(out, VOICE_RATE) == pytest.approx(300, abs=5)


def test_tempo_on_speech_halves_or_doubles_its_length(voice_speech):
    for speed, expected in ((2.0, 0.5), (0.5, 2.0)):
        tempo = Tempo(speed, VOICE_RATE)
        out = np.concatenate([tempo.process(voice_speech), tempo.flush()])
        assert len(out) / len(voice_speech) == pytest.approx(expected, rel=0.02)
