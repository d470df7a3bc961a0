"""OpenAI's audio API: ``/v1/audio/transcriptions``, ``/v1/audio/translations`` and ``/v1/audio/speech``, so
``client.audio.transcriptions.create(...)`` and ``client.audio.speech.create(...)`` of the ``openai`` client work
against this service unchanged.

Recognition is the ``asr`` model (Whisper), synthesis the ``tts`` model (a Piper voice). An upload is decoded
and bounded in the ingress (``deployments.audio``); a transcription is ``json`` (``{text, usage}``), ``text``,
``srt``, ``vtt`` or ``verbose_json`` (segments, and words with ``timestamp_granularities[]=word``), or with
``stream`` Server-Sent Events as OpenAI sends them (``transcript.text.delta``, then ``transcript.text.done``).
Speech streams as it is said, sentence by sentence, in the format asked for. Errors are OpenAI's, as on the
other OpenAI routes.
"""

import base64
import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from api.context import AdmissionDep, DataplaneDep
from api.knowledge import render_decision
from api.openai import schemas
from api.openai.routes import ERRORS, _event, _require, error_body
from api.openapi import inline
from api.policy import RoutePolicy, declare
from api.problems import problem
from api.v1.bodies import MULTIPART, content_type, read_body, read_form
from deployments.audio import MEDIA_TYPES
from deployments.contracts import LANGUAGES, SpeechRequest, Transcript, TranscriptionRequest
from deployments.errors import UnsupportedMediaType
from deployments.settings import limits
from pipelines.dataplane import Dataplane
from pipelines.speech import collect_transcript, mask_words

RECOGNITION_MODEL = "asr"
SPEECH_MODEL = "tts"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
SPEECH = "/v1/audio/speech"
FORM_LISTS = {"timestamp_granularities[]": "timestamp_granularities"}
"""Repeated form fields, by their name on the wire (OpenAI's, with brackets)."""

router = APIRouter(tags=["OpenAI-compatible"])


def _form_body(model: type) -> dict:
    """The OpenAPI request body of an audio form: the model's fields as form fields, the file as an upload."""
    schema = inline(model)
    properties = schema["properties"]
    properties["file"] = {
        "type": "string",
        "format": "binary",
        "minLength": 1,
        "maxLength": limits().max_audio_bytes,
        "description": "The audio file (FLAC, MP3, MP4/M4A, Ogg, WAV or WebM).",
    }
    if "timestamp_granularities" in properties:
        granularity = {"type": "string", "enum": ["word", "segment"]}
        properties["timestamp_granularities[]"] = {"type": "array", "items": granularity, "minItems": 1,
                                                   "maxItems": 2}  # fmt: skip
        del properties["timestamp_granularities"]
    content = {"schema": schema, "encoding": {"file": {"contentType": "audio/*, application/octet-stream"}}}
    return {"requestBody": {"required": True, "content": {MULTIPART: content}}}


TRANSCRIPT_RESPONSES = {
    **ERRORS,
    200: {
        "content": {
            "application/json": {},
            "text/plain": {},
            "application/x-subrip": {},
            "text/vtt": {},
            "text/event-stream": {},
        },
        "description": "JSON (json, verbose_json), text (text, srt, vtt), or with stream Server-Sent Events.",
    },
    413: {
        "model": schemas.ErrorResponse,
        "description": "The body or the audio is larger, or longer, than the limits.",
    },
}
AUDIO = RoutePolicy("openai", (RECOGNITION_MODEL,), ingress=8, proxy=16, timeout="long")
"""A transcription costs 0.12 to 0.4 CPU-seconds per second of audio, up to ``max_audio_seconds``."""


async def _heard(request: Request, dataplane: Dataplane, form_type: type, route: str):
    """The form, its policy and its audio, decoded; refused before any model work where something is wrong."""
    if content_type(request) != MULTIPART:
        raise UnsupportedMediaType(f"Content-Type must be {MULTIPART}, with the audio in field 'file'")
    form, files = await read_form(request, form_type, {"file": limits().max_audio_bytes}, FORM_LISTS)
    _require(dataplane, form.model, RECOGNITION_MODEL, "transcribe audio")
    policy = dataplane.policy(form.policy)  # an unknown policy is refused before any work
    audio = await dataplane.prepare_audio(route, request.state.deadline, raw=files["file"])
    return form, policy, audio


@router.post(
    declare(TRANSCRIPTIONS, AUDIO), responses=TRANSCRIPT_RESPONSES, openapi_extra=_form_body(schemas.TranscriptionForm)
)
async def transcriptions(request: Request, dataplane: DataplaneDep, admission: AdmissionDep):
    """The words of a recording, in its language (detected unless `language` is given), as `response_format`
    asks; with `stream`, as Server-Sent Events while it is heard, 30 s of audio at a time."""
    return await _transcribe(request, dataplane, admission, schemas.TranscriptionForm, "transcribe", TRANSCRIPTIONS)


@router.post(
    declare(TRANSLATIONS, AUDIO), responses=TRANSCRIPT_RESPONSES, openapi_extra=_form_body(schemas.TranslationForm)
)
async def translations(request: Request, dataplane: DataplaneDep, admission: AdmissionDep):
    """What a recording in any language Whisper knows says, in English text."""
    return await _transcribe(request, dataplane, admission, schemas.TranslationForm, "translate", TRANSLATIONS)


async def _transcribe(request: Request, dataplane: Dataplane, admission, form_type: type, task: str, route: str):
    deadline = request.state.deadline
    stack = contextlib.ExitStack()
    stack.enter_context(admission.slot(request))
    try:
        form, policy, audio = await _heard(request, dataplane, form_type, route)
        transcription = form if isinstance(form, schemas.TranscriptionForm) else None  # a translation has less
        stream = transcription is not None and transcription.stream
        asked = TranscriptionRequest(
            audio.samples, task=task, language=transcription.language if transcription else None,
            prompt=form.prompt, temperature=form.temperature,
            word_timestamps=transcription is not None and transcription.words(),
        )  # fmt: skip
        pieces = await dataplane.transcribe_stream(audio, asked, deadline)
        if stream and policy is None:
            return StreamingResponse(_transcript_events(pieces, stack), media_type="text/event-stream")
        with stack:
            transcript = await collect_transcript(pieces)
    except BaseException:
        stack.close()
        raise
    decision = None
    if policy is not None:
        decision = dataplane.judge(policy, route, input=transcript.text)  # a block is a 403
        transcript = _masked(transcript, decision)
    if stream:  # checked whole against the policy, then sent as one delta
        return StreamingResponse(_whole_events(transcript), media_type="text/event-stream")
    return _render(transcript, form.response_format, task, decision)


def _masked(transcript: Transcript, decision) -> Transcript:
    """The transcript with what the policy's masks match masked, segment by segment (and in their words)."""
    if not decision.masks:
        return transcript
    segments = []
    for segment in transcript.segments:
        text, _ = decision.mask(segment.text)
        words = segment.words
        if words and text != segment.text:
            words = mask_words(words, segment.text, text)
        segments.append(dataclasses.replace(segment, text=text, words=words))
    text = "".join(segment.text for segment in segments).strip()
    return dataclasses.replace(transcript, segments=segments, text=text)


def _usage(transcript: Transcript) -> schemas.AudioUsage:
    return schemas.AudioUsage(seconds=math.ceil(transcript.duration))


def _render(transcript: Transcript, response_format: str, task: str, decision):
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(subtitles(transcript, srt=True), media_type="application/x-subrip")
    if response_format == "vtt":
        return PlainTextResponse(subtitles(transcript, srt=False), media_type="text/vtt")
    if response_format == "verbose_json":
        words = transcript.words
        body = schemas.TranscriptionVerbose(
            task=task,
            language=LANGUAGES.get(transcript.language, transcript.language),
            duration=transcript.duration,
            text=transcript.text,
            segments=[schemas.TranscriptionSegment(**{k: v for k, v in vars(s).items() if k != "words"})
                      for s in transcript.segments],
            words=[schemas.TranscriptionWord(word=w.word.strip(), start=w.start, end=w.end) for w in words]
            if any(s.words is not None for s in transcript.segments) else None,
            usage=_usage(transcript),
        )  # fmt: skip
        content = body.model_dump(exclude_none=True)
    else:
        content = schemas.Transcription(text=transcript.text, usage=_usage(transcript)).model_dump()
    if decision is not None:
        content["policy"] = render_decision(decision, 0).model_dump()
    return JSONResponse(content)


def subtitles(transcript: Transcript, srt: bool) -> str:
    """The segments as SubRip (``srt``) or WebVTT cues."""
    cues = []
    for number, segment in enumerate(transcript.segments, start=1):
        times = f"{_timestamp(segment.start, srt)} --> {_timestamp(segment.end, srt)}"
        cues.append(f"{number}\n{times}\n{segment.text.strip()}\n" if srt else f"{times}\n{segment.text.strip()}\n")
    return "\n".join(cues) if srt else "WEBVTT\n\n" + "\n".join(cues)


def _timestamp(seconds: float, srt: bool) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{',' if srt else '.'}{millis:03d}"


async def _transcript_events(pieces: AsyncIterator, stack: contextlib.ExitStack) -> AsyncIterator[bytes]:
    """OpenAI's transcription events: a ``transcript.text.delta`` per segment as it is heard, then
    ``transcript.text.done`` with the whole text and the usage. An error after the response started is sent as
    an ``{"error": ...}`` event and ends the stream."""
    with stack:
        parts, duration = [], 0.0
        try:
            async for piece in pieces:
                duration = piece.duration
                if piece.segment is not None:
                    delta = piece.segment.text if parts else piece.segment.text.lstrip()
                    parts.append(delta)
                    yield _event({"type": "transcript.text.delta", "delta": delta})
        except Exception as exc:  # noqa: BLE001 - the status is sent already; the error goes in the stream
            yield _event(error_body(problem(exc)))
            return
        finally:
            await pieces.aclose()
        text = "".join(parts).strip()
        usage = schemas.AudioUsage(seconds=math.ceil(duration)).model_dump()
        yield _event({"type": "transcript.text.done", "text": text, "usage": usage})


async def _whole_events(transcript: Transcript) -> AsyncIterator[bytes]:
    yield _event({"type": "transcript.text.delta", "delta": transcript.text})
    yield _event({"type": "transcript.text.done", "text": transcript.text, "usage": _usage(transcript).model_dump()})


SPEECH_RESPONSES = {
    **ERRORS,
    200: {
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}} for media in sorted(set(MEDIA_TYPES.values()))
        }
        | {"text/event-stream": {}},
        "description": "The audio, streamed as each sentence is said; with stream_format sse, speech.audio events.",
    },
}


@router.post(
    declare(SPEECH, RoutePolicy("openai", (SPEECH_MODEL,), ingress=8, proxy=16, timeout="long")),
    responses=SPEECH_RESPONSES,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": inline(schemas.SpeechBody)}}}
    },
)
async def speech(request: Request, dataplane: DataplaneDep, admission: AdmissionDep):
    """The input said in the voice asked for, in `response_format`, streamed as it is made, sentence by sentence."""
    stack = contextlib.ExitStack()
    stack.enter_context(admission.slot(request))
    try:
        try:
            body, _ = await read_body(request, schemas.SpeechBody)
        except ValidationError as exc:
            if any(e["loc"] == ("input",) and e["type"] == "string_too_long" for e in exc.errors()):
                dataplane.refused_text(SPEECH)
            raise
        _require(dataplane, body.model, SPEECH_MODEL, "speak")
        asked = SpeechRequest(body.input, voice=body.voice, format=body.response_format, speed=body.speed)
        chunks = await dataplane.speak(asked, request.state.deadline)
    except BaseException:
        stack.close()
        raise
    if body.stream_format == "sse":
        return StreamingResponse(_speech_events(chunks, stack), media_type="text/event-stream")
    return StreamingResponse(_audio(chunks, stack), media_type=MEDIA_TYPES[body.response_format])


async def _audio(chunks: AsyncIterator, stack: contextlib.ExitStack) -> AsyncIterator[bytes]:
    """The encoded audio as it comes. An error after the response started ends it short (the client sees an
    incomplete body), as nothing else can be said in the middle of audio."""
    with stack:
        try:
            async for chunk in chunks:
                if chunk.audio:
                    yield chunk.audio
        finally:
            await chunks.aclose()


async def _speech_events(chunks: AsyncIterator, stack: contextlib.ExitStack) -> AsyncIterator[bytes]:
    """OpenAI's speech events: ``speech.audio.delta`` with base64 audio, then ``speech.audio.done``."""
    with stack:
        said = 0.0
        try:
            async for chunk in chunks:
                said += chunk.seconds
                if chunk.audio:
                    yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk.audio).decode()})
        except Exception as exc:  # noqa: BLE001 - the status is sent already; the error goes in the stream
            yield _event(error_body(problem(exc)))
            return
        finally:
            await chunks.aclose()
        yield _event({"type": "speech.audio.done", "usage": {"type": "duration", "seconds": math.ceil(said)}})


PATHS = tuple(route.path for route in router.routes)
"""The paths this router serves, whose errors are in OpenAI's shape."""
