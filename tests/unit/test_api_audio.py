"""The audio routes over a fake dataplane: OpenAI's transcriptions, translations and speech, chat's input_audio,
/v1/multimodal/ask and the recogniser over the Open Inference Protocol. The audio is really decoded and encoded;
the models are fakes that hear "a sound of <its seconds> seconds" and say 0.1 s of tone per character."""

import base64
import json

import numpy as np
import pytest

from api.access import Guard
from api.keys import ApiKey, RateLimit, digest
from api.limits import RateLimits, SharedLimits
from deployments.audio import AudioEncoder, decode_audio
from deployments.settings import limits
from tests.unit.fake_dataplane import client, events

RATE = 16_000


def tone(seconds: float, rate: int = RATE, fmt: str = "wav") -> bytes:
    """A 440 Hz tone, encoded."""
    samples = (np.sin(np.arange(round(seconds * rate)) * 2 * np.pi * 440 / rate) * 8000).astype(np.int16)
    encoder = AudioEncoder(fmt, rate, whole=True)
    return encoder.feed(samples) + encoder.finish()


WAV = tone(1.2)


def transcribe(api, route="/v1/audio/transcriptions", audio=WAV, **fields):
    data = {"model": "asr", **fields}
    return api.post(route, files={"file": ("clip.wav", audio, "audio/wav")}, data=data)


def test_a_transcription_is_openais_json_with_the_seconds_heard(api):
    answer = transcribe(api)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"text": "a sound of 1.2 seconds", "usage": {"type": "duration", "seconds": 2}}


def test_verbose_json_has_the_language_by_name_the_segments_and_the_words_asked_for(api, dataplane):
    body = transcribe(
        api, response_format="verbose_json", language="de", **{"timestamp_granularities[]": "word"}
    ).json()
    assert body["task"] == "transcribe" and body["language"] == "german" and body["duration"] == pytest.approx(1.2)
    assert [s["text"] for s in body["segments"]] == [" a", " sound", " of", " 1.2", " seconds"]
    assert [w["word"] for w in body["words"]] == ["a", "sound", "of", "1.2", "seconds"]
    assert all(w["start"] < w["end"] for w in body["words"])
    assert dataplane.calls[-1] == ("transcribe", "transcribe", "de", True)
    segments_only = transcribe(api, response_format="verbose_json").json()
    assert "words" not in segments_only and dataplane.calls[-1][-1] is False  # no alignment pass unless asked


def test_text_srt_and_vtt_are_text_with_cues_in_order(api):
    assert transcribe(api, response_format="text").text == "a sound of 1.2 seconds\n"
    srt = transcribe(api, response_format="srt")
    assert srt.headers["content-type"].startswith("application/x-subrip")
    cues = srt.text.strip().split("\n\n")
    assert cues[0] == "1\n00:00:00,000 --> 00:00:00,500\na" and cues[4].startswith("5\n00:00:02,000 --> 00:00:02,500")
    vtt = transcribe(api, response_format="vtt").text
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.500\na\n")


def test_a_streamed_transcription_is_deltas_that_join_to_the_text_then_done(api):
    response = transcribe(api, stream="true")
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = events(response)
    deltas = [p["delta"] for p in payloads if p["type"] == "transcript.text.delta"]
    done = payloads[-1]
    assert "".join(deltas) == done["text"] == "a sound of 1.2 seconds"
    assert done == {"type": "transcript.text.done", "text": done["text"], "usage": {"type": "duration", "seconds": 2}}


def test_a_translation_is_english_text(api, dataplane):
    assert transcribe(api, "/v1/audio/translations").json()["text"] == "A SOUND OF 1.2 SECONDS"
    assert dataplane.calls[-1][1] == "translate"
    refused = transcribe(api, "/v1/audio/translations", language="de")  # a translation's language is English
    assert refused.status_code == 400 and "language" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"model": "llm"}, "model", "does not transcribe audio"),
        ({"model": "whisper-1"}, "model", "no model named 'whisper-1'"),
        ({"language": "xx"}, "language", "unknown language"),
        ({"response_format": "csv"}, "response_format", "json"),
        ({"temperature": "2"}, "temperature", "less than or equal to 1"),
        ({"stream": "true", "response_format": "srt"}, None, "stream is for response_format json or text"),
        ({"timestamp_granularities[]": "word"}, None, "needs response_format verbose_json"),
        ({"include[]": "logprobs"}, "include[]", "Unrecognized request argument"),
    ],
)
def test_bad_forms_are_refused_in_openais_shape_naming_the_field(api, fields, param, words):
    refused = transcribe(api, **fields)
    assert refused.status_code in (400, 404), refused.text
    error = refused.json()["error"]
    assert words in error["message"] and error["param"] == param


def test_what_is_not_a_form_of_audio_is_refused_before_any_model_work(api, dataplane):
    assert api.post("/v1/audio/transcriptions", json={"model": "asr"}).status_code == 415
    missing = api.post("/v1/audio/transcriptions", data={"model": "asr"}, files={"other": ("x", b"x")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "other"
    no_file = api.post("/v1/audio/transcriptions", data={"model": "asr", "language": "en"},
                       files={"file": ("empty.wav", b"", "audio/wav")})  # fmt: skip
    assert no_file.status_code == 400 and no_file.json()["error"]["code"] == "empty_audio"
    text = transcribe(api, audio=b"Dear Sir, this is not a recording. " * 10)
    error = text.json()["error"]
    assert text.status_code == 400 and error["code"] == "invalid_audio" and error["param"] == "file"
    assert "Dear Sir" not in text.text  # the payload is never echoed
    silent = transcribe(api, audio=AudioEncoder("wav", RATE, whole=True).finish())
    assert silent.json()["error"]["code"] == "empty_audio"
    assert not [call for call in dataplane.calls if call[0] == "transcribe"]


def test_audio_over_the_byte_limit_is_413(api):
    big = b"RIFF" + b"\0" * limits().max_audio_bytes
    refused = transcribe(api, audio=big)
    assert refused.status_code == 413 and "larger than the limit" in refused.json()["error"]["message"]


def test_speech_streams_the_audio_in_the_format_asked_for(api, dataplane):
    text = "The capital of France is Paris. It is a city."
    for fmt, media in (("wav", "audio/wav"), ("mp3", "audio/mpeg"), ("flac", "audio/flac"), ("opus", "audio/ogg")):
        said = api.post(
            "/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": text, "response_format": fmt}
        )
        assert said.status_code == 200 and said.headers["content-type"] == media
        assert decode_audio(said.content, limits()).duration_s == pytest.approx(0.1 * (len(text) - 2), abs=0.1)
    pcm = api.post("/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": "Hi.", "response_format": "pcm"})
    assert len(pcm.content) == 2 * round(0.3 * 24_000)  # OpenAI's pcm: 16-bit mono at 24 kHz
    assert dataplane.calls[-1] == ("speak", "Hi.", "joe", "pcm", 1.0)


def test_speech_as_server_sent_events(api):
    asked = {"model": "tts", "voice": "joe", "input": "One. Two.", "response_format": "wav", "stream_format": "sse"}
    response = api.post("/v1/audio/speech", json=asked)
    payloads = events(response)
    audio = b"".join(base64.b64decode(p["audio"]) for p in payloads if p["type"] == "speech.audio.delta")
    assert payloads[-1] == {"type": "speech.audio.done", "usage": {"type": "duration", "seconds": 1}}
    assert decode_audio(audio, limits()).duration_s == pytest.approx(0.7, abs=0.05)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"voice": "alloy"}, "voice", "no such voice; the voices are: joe"),
        ({"input": "x" * (limits().max_speech_chars + 1)}, "input", "at most"),
        ({"input": ""}, "input", "at least 1"),
        ({"speed": 5}, "speed", "less than or equal to 4"),
        ({"response_format": "ogg"}, "response_format", "mp3"),
        ({"instructions": "cheerful"}, "instructions", "Unrecognized request argument"),
        ({"model": "llm"}, "model", "does not speak"),
    ],
)
def test_bad_speech_requests_are_refused_naming_the_field(api, body, param, words):
    refused = api.post("/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": "Hello."} | body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert words in error["message"] and error["param"] == param


def audio_part(audio: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt}}


def test_chat_hears_input_audio_and_answers_what_was_said(api, dataplane):
    messages = [{"role": "user", "content": [audio_part(WAV), {"type": "text", "text": "please"}]}]
    body = api.post("/v1/chat/completions", json={"model": "llm", "messages": messages}).json()
    assert body["choices"][0]["message"]["content"] == "you said a sound of 1.2 seconds please"
    assert body["transcripts"] == [{"text": "a sound of 1.2 seconds", "language": "en", "duration": 1.2}]
    streamed = events(api.post("/v1/chat/completions", json={"model": "llm", "messages": messages, "stream": True}))
    assert streamed[-2]["transcripts"] == body["transcripts"]


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([{"role": "assistant", "content": [audio_part(WAV)]}], "messages.0", "audio is accepted in user messages"),
        ([{"role": "user", "content": [audio_part(WAV)] * (limits().max_audio_clips + 1)}], "messages", "audio clips"),
        ([{"role": "user", "content": [audio_part(b"not audio at all")]}], "messages.0.content.0.input_audio.data",
         "not audio"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}],
         "messages.0.content.0.input_audio.data", "base64"),
    ],
)  # fmt: skip
def test_bad_audio_in_a_chat_is_refused_naming_where_it_is(api, messages, param, words):
    refused = api.post("/v1/chat/completions", json={"model": "llm", "messages": messages})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert words in error["message"] and error["param"] == param


def test_ask_hears_the_question_answers_it_and_says_the_answer(api):
    answer = api.post(
        "/v1/multimodal/ask",
        json={"audio": base64.b64encode(WAV).decode(), "text": "now", "speak": True, "max_tokens": 50},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["transcript"] == {"text": "a sound of 1.2 seconds", "language": "en", "duration": 1.2}
    assert body["question"] == "a sound of 1.2 seconds now"
    assert body["answer"].startswith("you said")
    spoken = decode_audio(base64.b64decode(body["speech"]["audio"]), limits())
    assert body["speech"]["format"] == "wav" and spoken.duration_s == pytest.approx(
        body["speech"]["duration"], abs=0.01
    )
    assert set(body["seconds"]) == {"asr", "llm", "tts"} and set(body["models"]) == {"asr", "llm", "tts"}
    assert body["usage"]["audio_seconds_heard"] == 1.2 and body["usage"]["audio_seconds_spoken"] > 0


def test_ask_takes_a_form_with_audio_and_image_files(api, chelsea_jpeg):
    answer = api.post("/v1/multimodal/ask", files={"audio": ("q.wav", WAV, "audio/wav"),
                                                   "image": ("cat.jpg", chelsea_jpeg, "image/jpeg")},
                        data={"max_tokens": "50"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["evidence"]["classes"] and set(body["seconds"]) == {"asr", "vision", "ocr", "llm"}
    assert body["speech"] is None


def test_ask_without_a_question_is_refused_and_an_image_alone_is_asked_about(api, chelsea_jpeg):
    refused = api.post("/v1/multimodal/ask", json={"speak": True})
    assert refused.status_code == 422 and "send audio, a text, an image" in refused.text
    image = api.post(
        "/v1/multimodal/ask", json={"image": base64.b64encode(chelsea_jpeg).decode(), "max_tokens": 9}
    ).json()
    assert image["question"] == "What is in this picture?"


def test_the_recogniser_over_the_open_inference_protocol(api):
    files = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [2],
                         "data": [base64.b64encode(WAV).decode(), base64.b64encode(tone(0.5)).decode()]}]}  # fmt: skip
    body = api.post("/v2/models/asr/infer", json=files).json()
    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    assert outputs["text"] == ["a sound of 1.2 seconds", "a sound of 0.5 seconds"] and outputs["language"] == ["en"] * 2
    samples = (np.sin(np.arange(44_100) / 7) * 0.5).astype(np.float32)
    header = {"inputs": [{"name": "samples", "datatype": "FP32", "shape": [44_100],
                          "parameters": {"binary_data_size": samples.nbytes}}],
              "parameters": {"sample_rate": 44_100}}  # fmt: skip
    raw = json.dumps(header).encode()
    response = api.post("/v2/models/asr/infer", content=raw + samples.tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(raw))})  # fmt: skip
    assert {o["name"]: o["data"] for o in response.json()["outputs"]}["text"] == ["a sound of 1.0 seconds"]
    one_sample = {"name": "samples", "datatype": "FP32", "shape": [1], "data": [0.0]}
    both = api.post("/v2/models/asr/infer", json={"inputs": [*files["inputs"], one_sample]})
    assert both.status_code == 400 and "not both" in both.json()["error"]
    metadata = api.get("/v2/models/asr").json()
    assert [t["name"] for t in metadata["inputs"]] == ["audio", "samples"]


@pytest.fixture
def keyed(dataplane):
    class InProcess(SharedLimits):
        def __init__(self):
            super().__init__("unused")
            self.local = RateLimits()

        async def _call(self, method, *args):
            return getattr(self.local, method)(*args)

    guard = Guard(InProcess())
    guard.configure(True, [
        ApiKey(id="chat", sha256=digest("maas_chat"), routes=["openai"], models=["llm"]),
        ApiKey(id="speech", sha256=digest("maas_speech"), routes=["openai"], models=["asr", "tts", "llm"],
               rate_limit=RateLimit(requests_per_s=100, audio_seconds_per_minute=2)),
    ], None)  # fmt: skip
    return client(dataplane, guard=guard)


def test_a_key_without_the_speech_models_is_refused_on_the_audio_routes_and_audio_in_chat(keyed):
    chat = {"Authorization": "Bearer maas_chat"}
    refused = keyed.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", WAV)}, data={"model": "asr"}, headers=chat
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
    said = keyed.post("/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": "Hi."}, headers=chat)
    assert said.status_code == 403
    messages = [{"role": "user", "content": [audio_part(WAV)]}]
    heard = keyed.post("/v1/chat/completions", json={"model": "llm", "messages": messages}, headers=chat)
    assert heard.status_code == 403 and "asr" in heard.json()["error"]["message"]
    text = keyed.post("/v1/chat/completions", json={"model": "llm", "messages": [{"role": "user", "content": "hi"}]},
                      headers=chat)  # fmt: skip
    assert text.status_code == 200


def test_audio_seconds_are_charged_to_the_key_and_the_debt_is_waited_out(keyed):
    speech = {"Authorization": "Bearer maas_speech"}
    assert transcribe_with(keyed, speech).status_code == 200  # 1.2 s of the 2 a minute
    assert transcribe_with(keyed, speech).status_code == 200  # the bucket was not empty: 0.4 s owed now
    refused = transcribe_with(keyed, speech)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 12  # 0.4 s at 2 s a minute


def transcribe_with(api, headers):
    return api.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV)}, data={"model": "asr"}, headers=headers)
