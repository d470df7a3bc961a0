"""Speech on the running app: real recordings heard by the real recogniser, speech said by the real voice and
heard back, a spoken question answered, through OpenAI's own client, curl-like HTTP and Triton's client.

The recordings are LibriVox read speech from Debian's pocketsphinx-testdata (``tests/conftest.py``). Word
error rates compare words as ``words_of`` spells them (lower case, no punctuation, "Mr." as "mister")."""

import base64
import io
import json
import struct
import time
import wave

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton

from benchmarks.wer import word_error_rate
from tests.conftest import transcode
from tests.serving import replica_actors


@pytest.fixture(scope="module")
def audio_client(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client
    client.close()


def heard(audio_client, audio: bytes, name: str = "clip.wav", **options):
    return audio_client.audio.transcriptions.create(model="asr", file=(name, audio), **options)


def test_read_speech_is_heard_word_for_word_with_increasing_word_times(audio_client, librivox):
    errors, words = 0.0, 0
    for clip in librivox:
        answer = heard(audio_client, clip.wav, response_format="verbose_json", timestamp_granularities=["word"])
        reference = len(clip.words.split())
        errors += word_error_rate(clip.words, answer.text) * reference
        words += reference
        assert answer.language == "english" and answer.duration == pytest.approx(len(clip.wav[44:]) / 32_000, abs=0.01)
        starts = [word.start for word in answer.words]
        assert starts == sorted(starts) and all(w.start <= w.end for w in answer.words)
        assert answer.words[0].start >= 0 and answer.words[-1].end <= answer.duration + 0.01
    assert errors / words <= 0.05, f"word error rate {errors / words:.3f} over {words} words"


def test_subtitles_are_cues_over_the_clip(audio_client, librivox):
    clip = librivox[0]
    srt = heard(audio_client, clip.wav, response_format="srt", language="en")
    number, times, *text = srt.strip().split("\n\n")[0].split("\n")
    assert (
        number == "1"
        and times.startswith("00:00:00,000 --> 00:00:0")
        and word_error_rate(clip.words, " ".join(text)) < 0.1
    )
    vtt = heard(audio_client, clip.wav, response_format="vtt", language="en")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:0")


def test_the_same_speech_in_flac_ogg_and_mp3_at_44_khz_stereo_is_heard_as_the_same_words(audio_client, librivox):
    for clip in librivox[:2]:
        wav = heard(audio_client, clip.wav, language="en").text
        for fmt in ("flac", "ogg", "mp3"):
            other = heard(audio_client, transcode(clip.wav, fmt), f"clip.{fmt}", language="en").text
            assert word_error_rate(wav, other) == 0, (fmt, wav, other)


def test_streamed_deltas_join_to_the_text_heard_whole(app_url, librivox):
    clip = librivox[3]
    with httpx.Client(base_url=app_url, timeout=120) as http:
        whole = http.post("/v1/audio/transcriptions", files={"file": ("c.wav", clip.wav)}, data={"model": "asr"})
        streamed = http.post("/v1/audio/transcriptions", files={"file": ("c.wav", clip.wav)},
                             data={"model": "asr", "stream": "true"})  # fmt: skip
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    payloads = [json.loads(event) for event in events]
    deltas = "".join(p["delta"] for p in payloads if p["type"] == "transcript.text.delta")
    assert deltas == payloads[-1]["text"] == whole.json()["text"]
    assert payloads[-1]["usage"] == {"type": "duration", "seconds": 7}


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_speech_said_is_heard_back_as_the_sentence(audio_client, fmt):
    sentence = "The quick brown fox jumps over the lazy dog, and the train leaves at seven in the evening."
    said = audio_client.audio.speech.create(model="tts", voice="joe", input=sentence, response_format=fmt)
    back = heard(audio_client, said.content, f"said.{fmt}", language="en")
    assert word_error_rate(sentence, back.text) <= 0.10, back.text


def test_speech_streams_before_the_whole_text_is_said(app_url):
    text = " ".join(f"This is sentence number {n}, said on its own." for n in range(12))
    body = {"model": "tts", "voice": "joe", "input": text, "response_format": "wav"}
    with httpx.Client(base_url=app_url, timeout=120) as http:
        start = time.monotonic()
        with http.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
            arrivals, data = [], b""
            for piece in response.iter_bytes():
                arrivals.append(time.monotonic() - start)
                data += piece
    assert len(arrivals) > 5, "the speech came in one piece"
    assert arrivals[0] < arrivals[-1] / 2  # the first sentence was playable long before the last was said
    with wave.open(io.BytesIO(data[:44] + data[44:])) as reader:  # a streamed WAV: its length is left open
        assert reader.getframerate() == 22_050 and reader.getnchannels() == 1


def test_a_spoken_question_in_chat_is_answered(audio_client):
    question = audio_client.audio.speech.create(
        model="tts", voice="joe", input="What is the capital of France?", response_format="wav"
    ).content
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(question).decode(), "format": "wav"}}
    answer = audio_client.chat.completions.create(
        model="llm", temperature=0, messages=[{"role": "user", "content": [part]}]
    )
    assert "Paris" in answer.choices[0].message.content
    (transcript,) = answer.model_extra["transcripts"]
    assert word_error_rate("what is the capital of france", transcript["text"]) == 0 and transcript["language"] == "en"


def test_ask_hears_a_spoken_question_about_a_photo_and_says_the_answer(client, audio_client, chelsea_jpeg):
    question = audio_client.audio.speech.create(
        model="tts", voice="joe", input="What animal is in this picture?", response_format="mp3"
    ).content
    files = {"audio": ("q.mp3", question, "audio/mpeg"), "image": ("cat.jpg", chelsea_jpeg, "image/jpeg")}
    response = client.post("/v1/multimodal/ask", files=files, data={"speak": "true", "language": "en"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert word_error_rate("what animal is in this picture", body["transcript"]["text"]) <= 0.2  # "was" for "is"
    assert "cat" in body["answer"].lower()
    assert {"asr", "vision", "ocr", "llm", "tts"} <= set(body["seconds"]) and set(body["models"]) == set(
        body["seconds"]
    )
    spoken = heard(audio_client, base64.b64decode(body["speech"]["audio"]), "answer.wav", language="en")
    assert word_error_rate(body["answer"], spoken.text) <= 0.2


def test_the_recogniser_over_the_open_inference_protocol_with_tritons_client(app_url, librivox):
    clip = librivox[1]
    client = triton.InferenceServerClient(app_url.removeprefix("http://"))
    audio = triton.InferInput("audio", [1], "BYTES")
    audio.set_data_from_numpy(np.array([clip.wav], dtype=object), binary_data=True)
    result = client.infer("asr", [audio], parameters={"language": "en"})
    assert word_error_rate(clip.words, result.as_numpy("text")[0].decode()) == 0
    with wave.open(io.BytesIO(clip.wav)) as reader:
        samples = np.frombuffer(reader.readframes(reader.getnframes()), "<i2").astype(np.float32) / 32768
    raw = triton.InferInput("samples", [len(samples)], "FP32")
    raw.set_data_from_numpy(samples, binary_data=True)
    result = client.infer("asr", [raw], parameters={"sample_rate": 16000, "language": "en"})
    assert word_error_rate(clip.words, result.as_numpy("text")[0].decode()) == 0
    assert result.as_numpy("duration")[0] == pytest.approx(len(samples) / 16000)


# --- what would cost too much is refused first, quickly, with bounded memory -------------------------------


def wav_header(rate: int, channels: int, frames: int) -> bytes:
    data = frames * channels * 2
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data)


def stated_hours_flac(flac: bytes, hours: float) -> bytes:
    """A FLAC whose STREAMINFO states ``hours`` of audio (its frames hold a few seconds)."""
    fields = int.from_bytes(flac[18:26], "big")
    rate = fields >> 44
    total = int(hours * 3600 * rate)
    return flac[:18] + ((fields & ~((1 << 36) - 1)) | total).to_bytes(8, "big") + flac[26:]


def test_hostile_audio_is_refused_quickly_naming_the_limit_with_bounded_memory(
    client, librivox, ingress_peak_growth_mib
):
    silence = np.zeros(16000, np.int16).tobytes()
    cases = [
        (b"ID3" + b"\0" * 64, 400, "invalid_audio", "the mp3 file cannot be read"),
        (b"This is plain text, not a recording.", 400, "invalid_audio", "not audio of a supported format"),
        (wav_header(16000, 1, 16000) + silence, 400, "empty_audio", "no sound"),
        (wav_header(4000, 1, 4000) + silence[:8000], 400, "unsupported_audio", "sample rate is 4000 Hz"),
        (wav_header(16000, 9, 1600) + silence[:28800] + silence[:28800], 400, "unsupported_audio", "9 channels"),
        (stated_hours_flac(transcode(librivox[0].wav, "flac", 16000, "mono"), 10), 413, "audio_too_long",
         "the audio is 36000 s long; the limit is 600 s"),
        (transcode(librivox[0].wav, "ogg")[:3000], 400, "invalid_audio", "the ogg file cannot be read"),
    ]  # fmt: skip
    for _ in range(2):  # both ingress replicas get some of each
        for audio, status, code, words in cases:
            start = time.monotonic()
            response = client.post("/v1/audio/transcriptions", files={"file": ("a", audio)}, data={"model": "asr"})
            took = time.monotonic() - start
            error = response.json()["error"]
            assert (response.status_code, error["code"], error["param"]) == (status, code, "file"), response.text
            assert words in error["message"] and took < 5, (error, took)
    long_text = client.post("/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": "word " * 1000})
    assert long_text.status_code == 400 and long_text.json()["error"]["param"] == "input"
    assert ingress_peak_growth_mib() < 150


def test_a_client_that_hangs_up_stops_its_transcription(app_url, librivox):
    """Four minutes of speech is eight 30 s windows, a second or more of CPU each; a client that leaves after the
    first delta leaves the recogniser idle once the window it was decoding is done."""
    clips = []
    for clip in librivox:
        with wave.open(io.BytesIO(clip.wav)) as reader:
            clips.append(reader.readframes(reader.getnframes()) + bytes(16000))  # and half a second of silence
    speech = b"".join(clips) * 9  # 245 s of read speech, the five clips in turn
    long_wav = wav_header(16000, 1, len(speech) // 2) + speech
    pids = list(replica_actors("SpeechRecognizer").values())

    def cpu_s() -> float:
        total = 0.0
        for pid in pids:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks
        return total

    with httpx.Client(base_url=app_url, timeout=120) as http:
        form = {"model": "asr", "stream": "true", "language": "en"}
        start, spent = time.monotonic(), cpu_s()
        with http.stream("POST", "/v1/audio/transcriptions", files={"file": ("long.wav", long_wav)}, data=form) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and "transcript.text.delta" in line:
                    break  # hang up after the first window
        window_s, window_cpu_s = time.monotonic() - start, cpu_s() - spent
    time.sleep(max(3.0, 2 * window_s))  # the window in progress ends
    before = cpu_s()
    time.sleep(4)
    idle = cpu_s() - before
    assert idle < 0.5, f"the recogniser kept decoding windows nobody was waiting for: {idle:.1f} CPU-s in 4 s"
    assert window_cpu_s * 8 > 4, "the audio was too short to tell a stopped transcription from a finished one"
