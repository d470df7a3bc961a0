"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models``, so the ``openai`` client (or LangChain, or curl) works against this service by changing its
``base_url``.

Generation is the ``llm`` model, streamed as Server-Sent Events when ``stream`` is set; embeddings are the
``text`` model, the same vectors as ``/v1/text/embed``. Errors are OpenAI's ``{"error": {"message", "type",
"param", "code"}}``, with 400 for a request that does not fit (422 elsewhere on ``/v1``).
"""

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.access import require_models
from api.context import AdmissionDep, DataplaneDep
from api.knowledge import render_decision, render_sources
from api.openai import answers, schemas
from api.openapi import inline
from api.policy import RoutePolicy, declare
from api.problems import Problem, problem
from api.v1.bodies import read_body
from deployments.contracts import GenerationChunk, GenerationRequest, Transcript, TranscriptionRequest
from deployments.downstream import Deadline
from deployments.errors import InvalidInput, MaasError
from pipelines.dataplane import Dataplane, PreparedImage, collect
from pipelines.grounding import ImagePart
from pipelines.registry import UnknownModel

GENERATION_MODEL = "llm"
CHAT = "/v1/chat/completions"
EMBEDDING_MODEL = "text"

router = APIRouter(tags=["OpenAI-compatible"])


def error_body(problem: Problem) -> dict:
    status = 400 if problem.status == 422 else problem.status
    first = problem.detail[0] if problem.detail else {"loc": [], "type": "error"}
    param = _param(first["loc"])
    messages = []
    for entry in problem.detail:
        where = _param(entry["loc"])
        if entry["type"] == "extra_forbidden":  # OpenAI's words for a field it does not know
            messages.append(f"Unrecognized request argument supplied: {where}")
        else:
            messages.append(f"{where}: {entry['msg']}" if where else entry["msg"])
    message = "; ".join(dict.fromkeys(messages)) or "error"
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": first["type"],
        }
    }


def _param(loc: list) -> str | None:
    """The request field a location names, as a dotted path (``messages.0.role``)."""
    return ".".join(str(part) for part in loc if part != "body" and _is_field(part)) or None


def _is_field(part) -> bool:
    """A field name or list index, not the name of a type pydantic tried (``str``, ``list[constrained-str]``)."""
    return isinstance(part, int) or (FIELD.fullmatch(part) is not None and part not in PYDANTIC_TYPES)


FIELD = re.compile(r"[a-z_][a-z0-9_]*(?:\[\])?")  # a form field may repeat: `timestamp_granularities[]`
PYDANTIC_TYPES = {"str", "int", "float", "bool", "list", "dict", "none"}


def render_error(problem: Problem) -> JSONResponse:
    status = 400 if problem.status == 422 else problem.status
    return JSONResponse(status_code=status, content=error_body(problem), headers=problem.headers)


ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "The request does not fit; `error.param` names the field."},
    404: {"model": schemas.ErrorResponse, "description": "No such model."},
    413: {"model": schemas.ErrorResponse, "description": "The body is larger than the limits."},
    415: {"model": schemas.ErrorResponse, "description": "The Content-Type is not application/json."},
    503: {"model": schemas.ErrorResponse, "description": "Overloaded, starting or updating: retry after Retry-After."},
}
# A generation's 200 is JSON, or Server-Sent Events with ``stream``.
GENERATION_RESPONSES = {
    **ERRORS,
    200: {"content": {"text/event-stream": {}}, "description": "With stream: Server-Sent Events of chunks."},
}


def _body(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(model)}}}}


def _require(dataplane: Dataplane, name: str, expected: str, task: str) -> None:
    if name not in set(dataplane.models):  # the registry raises its own 404 on a lookup; this names the field
        raise UnknownModel(f"no model named {name!r}; models: {', '.join(dataplane.models)}", field="model")
    if name != expected:
        raise InvalidInput(f"model {name!r} does not {task}; use {expected!r}", field="model")


# --- models -----------------------------------------------------------------------------


@router.get(
    declare("/v1/models", RoutePolicy("openai")), response_model=schemas.ModelList, responses={503: ERRORS[503]}
)
async def models(request: Request, dataplane: DataplaneDep) -> schemas.ModelList:
    """Every model of the graph in OpenAI's list shape; each entry also carries what the replica that answered
    serves (name, task, version, source, device, resources, placement, details, drift)."""
    infos = await dataplane.models.infos(request.state.deadline)
    rollouts = await dataplane.rollouts.summary(request.state.deadline)
    cards = []
    for info in infos:
        fields = dict(info)
        name = fields.pop("deployment")
        cards.append(schemas.ModelCard(id=name, created=fields.pop("created"), rollout=rollouts.get(name), **fields))
    return schemas.ModelList(data=cards)


# --- generation ---------------------------------------------------------------------------


async def _generation(request: Request, dataplane: Dataplane, admission, body_type: type, start: Callable):
    """Parse, check the model, take an admission slot and start the generation (``start(body)``): the body, the
    chunks, and the exit stack that holds the slot (closed when the answer is done)."""
    stack = contextlib.ExitStack()
    stack.enter_context(admission.slot(request))
    try:
        body, _ = await read_body(request, body_type)
        _require(dataplane, body.model, GENERATION_MODEL, "generate text")
        chunks = await start(body)
    except BaseException:
        stack.close()
        raise
    return body, chunks, stack


async def _chat_image(dataplane: Dataplane, where: tuple, url: str, deadline: Deadline) -> PreparedImage:
    """A chat's image, decoded and prepared for vision and OCR; its errors name where it is in the request."""
    try:
        return await dataplane.prepare_views(CHAT, deadline, image_b64=url, vision=True, ocr=True)
    except MaasError as exc:
        if exc.field == "image":
            exc.field = where
        raise


async def _chat_audio(dataplane: Dataplane, where: tuple, clip: schemas.InputAudio, deadline: Deadline) -> Transcript:
    """What a chat's audio clip says (heard by the ``asr`` model); its errors name where it is in the request."""
    try:
        audio = await dataplane.prepare_audio(CHAT, deadline, audio_b64=clip.data, field=where)
        return await dataplane.transcribe(audio, TranscriptionRequest(audio.samples), deadline)
    except MaasError as exc:
        if exc.field in ("file", "audio"):
            exc.field = where
        raise


def _chat_messages(body: schemas.ChatCompletionRequest, heard: list[Transcript] = ()) -> list[dict]:
    """The chat for the dataplane: each message's text, or, where it holds images or audio, its parts in order:
    text, ``ImagePart`` with the image's index among the chat's images, and each audio clip's transcript (what
    the user said, as if typed)."""
    messages, images, clips = [], 0, 0
    for message in body.messages:
        content: str | list = message.text()
        if message.images() or message.audios():
            content = []
            for part in message.content:
                if isinstance(part, schemas.ImagePart):
                    content.append(ImagePart(images))
                    images += 1
                elif isinstance(part, schemas.AudioPart):
                    content.append(heard[clips].text)
                    clips += 1
                else:
                    content.append(part.text)
            if not message.images():
                content = "\n".join(content)
        entry = {"role": message.chat_role(), "content": None if message.content is None else content}
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    return messages


def _sampling(body: schemas.Sampling, max_tokens: int | None) -> dict:
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stops(),
    }


def _usage(chunk: GenerationChunk) -> schemas.Usage:
    prompt, completion = chunk.prompt_tokens, chunk.completion_tokens
    return schemas.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _collect(chunks: AsyncIterator[GenerationChunk], stack: contextlib.ExitStack) -> tuple[str, GenerationChunk]:
    with stack:
        return await collect(chunks)


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse(
    chunks: AsyncIterator[GenerationChunk], stack: contextlib.ExitStack, render: Callable[[GenerationChunk], dict]
) -> AsyncIterator[bytes]:
    """Server-Sent Events of a generation: one event per chunk, then ``[DONE]``. An error after the response
    started is sent as an ``{"error": ...}`` event, as OpenAI does, and ends the stream."""
    with stack:
        try:
            async for chunk in chunks:
                for payload in render(chunk):
                    yield _event(payload)
        except Exception as exc:  # noqa: BLE001 - the status is sent already; the error goes in the stream
            yield _event(error_body(problem(exc)))
            return
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"


def _envelope(kind: str, ident: str, created: int, chunk: GenerationChunk) -> dict:
    return {"id": ident, "object": kind, "created": created, "model": GENERATION_MODEL,
            "system_fingerprint": chunk.version}  # fmt: skip


@router.post(
    declare(CHAT, RoutePolicy("openai", ("llm",), ("vision", "ocr", "asr"), ingress=32, proxy=64, timeout="long")),
    response_model=schemas.ChatCompletion,
    responses=GENERATION_RESPONSES,
    openapi_extra=_body(schemas.ChatCompletionRequest),
)
async def chat_completions(request: Request, dataplane: DataplaneDep, admission: AdmissionDep):
    """A chat's next assistant message; with ``stream``, as ``chat.completion.chunk`` events.

    Images (``image_url`` parts with a data URL) are looked at by the vision and OCR models in parallel; the
    language model reads, in place of each, ``[Image N]`` and what they found in it (the ImageNet classes it
    is most sure of and the text read), and is told to answer about images from that evidence only. Audio
    (``input_audio`` parts, base64 WAV or MP3) is heard by the ``asr`` model first: the language model reads
    what was said, as if typed, and the answer's ``transcripts`` say what was heard.
    """
    deadline = request.state.deadline
    grounded: dict = {}  # what start() learnt: the knowledge given, the policy's decision

    async def start(body: schemas.ChatCompletionRequest) -> AsyncIterator[GenerationChunk]:
        policy = dataplane.policy(body.policy)  # an unknown policy is refused before any work
        images, clips = body.image_urls(), body.audio_parts()
        if images:
            require_models(request, {"vision", "ocr"})
        if clips:
            require_models(request, {"asr"})
        # Images are decoded while the audio is decoded and heard.
        prepared, heard = await asyncio.gather(
            asyncio.gather(*(_chat_image(dataplane, where, url, deadline) for where, url in images)),
            asyncio.gather(*(_chat_audio(dataplane, where, clip, deadline) for where, clip in clips)),
        )
        if clips:
            grounded["transcripts"] = [
                schemas.HeardAudio(text=t.text, language=t.language, duration=t.duration) for t in heard
            ]
        dataplane.observe_generation(CHAT, schemas.format_kind(body.response_format), body.choice())
        generation = GenerationRequest(
            messages=_chat_messages(body, heard),
            **_sampling(body, body.token_cap()),
            grammar=body.grammar(),
            logprobs=body.top(),
            tools=body.functions() or None,
        )
        if not images and not body.knowledge and policy is None:
            return await dataplane.generate(generation, deadline)
        chat = await dataplane.chat(generation, list(prepared), deadline, body.knowledge, policy, CHAT)
        grounded["knowledge"] = render_sources(chat.facts) if body.knowledge else None
        if policy is None:
            return chat.chunks
        # The answer is judged whole before any of it is sent: a block is a 403, not an error mid-stream.
        text, last = await collect(chat.chunks)
        looked = chat.looked
        decision = dataplane.judge(policy, CHAT, [item.vision for item in looked], [item.ocr for item in looked],
                                   output=text, input=dataplane.last_user_text(generation.messages))  # fmt: skip
        text, masked = decision.mask(text)
        grounded["policy"] = render_decision(decision, chat.masked + masked)
        return _whole(text, last)

    body, chunks, stack = await _generation(request, dataplane, admission, schemas.ChatCompletionRequest, start)
    ident, created = schemas.completion_id("chatcmpl"), schemas.now()
    tools = body.choice() != "none"
    if body.stream:
        include_usage = body.include_usage()
        stream = answers.ChatEvents(tools, body.logprobs)

        def render(chunk: GenerationChunk) -> list[dict]:
            envelope = _envelope("chat.completion.chunk", ident, created, chunk)
            events = []
            for choice in stream.choices(chunk):
                ending = _extensions(grounded) if choice["finish_reason"] is not None else {}
                events.append({**envelope, "choices": [choice], **ending})
            if chunk.finish_reason is not None and include_usage:
                events.append({**envelope, "choices": [], "usage": _usage(chunk).model_dump()})
            return events

        return StreamingResponse(_sse(chunks, stack, render), media_type="text/event-stream")
    text, last = await _collect(chunks, stack)
    message, finish_reason = answers.chat_message(text, last.finish_reason, tools)
    return schemas.ChatCompletion(
        id=ident,
        created=created,
        model=GENERATION_MODEL,
        system_fingerprint=last.version,
        choices=[
            schemas.ChatChoice(
                message=message, finish_reason=finish_reason, logprobs=answers.chat_logprobs(last.logprobs)
            )
        ],
        usage=_usage(last),
        knowledge=grounded.get("knowledge"),
        policy=grounded.get("policy"),
        transcripts=grounded.get("transcripts"),
    )


def _extensions(grounded: dict) -> dict:
    """The knowledge and policy fields of a streamed answer's last event, where there are any."""
    extensions = {}
    if grounded.get("knowledge") is not None:
        extensions["knowledge"] = [source.model_dump() for source in grounded["knowledge"]]
    if grounded.get("policy") is not None:
        extensions["policy"] = grounded["policy"].model_dump()
    if grounded.get("transcripts") is not None:
        extensions["transcripts"] = [heard.model_dump() for heard in grounded["transcripts"]]
    return extensions


async def _whole(text: str, last: GenerationChunk) -> AsyncIterator[GenerationChunk]:
    """A checked answer as a generation's stream: the opening chunk, then the whole text with the last's ending."""
    yield dataclasses.replace(last, text="", completion_tokens=0, finish_reason=None)
    yield dataclasses.replace(last, text=text)


@router.post(
    declare("/v1/completions", RoutePolicy("openai", ("llm",), ingress=32, proxy=64, timeout="long")),
    response_model=schemas.Completion,
    responses=GENERATION_RESPONSES,
    openapi_extra=_body(schemas.CompletionRequest),
)
async def completions(request: Request, dataplane: DataplaneDep, admission: AdmissionDep):
    """The continuation of a raw prompt (no chat template); with ``stream``, as ``text_completion`` events."""

    def to_request(body: schemas.CompletionRequest) -> GenerationRequest:
        return GenerationRequest(
            prompt=body.text(), **_sampling(body, body.max_tokens), grammar=body.grammar(), logprobs=body.logprobs
        )

    async def start(body: schemas.CompletionRequest) -> AsyncIterator[GenerationChunk]:
        dataplane.observe_generation("/v1/completions", body.format_kind(), "none")
        return await dataplane.generate(to_request(body), request.state.deadline)

    body, chunks, stack = await _generation(request, dataplane, admission, schemas.CompletionRequest, start)
    ident, created = schemas.completion_id("cmpl"), schemas.now()
    if body.stream:
        include_usage = body.include_usage()
        sent = 0  # characters of the completion so far, for the tokens' text_offset

        def render(chunk: GenerationChunk) -> list[dict]:
            nonlocal sent
            if not chunk.text and not chunk.logprobs and chunk.finish_reason is None:
                return []
            envelope = _envelope("text_completion", ident, created, chunk)
            logprobs = answers.completion_logprobs(chunk.logprobs, sent)
            sent += len(chunk.text)
            choice = {"index": 0, "text": chunk.text, "logprobs": logprobs and logprobs.model_dump(),
                      "finish_reason": chunk.finish_reason}  # fmt: skip
            events = [{**envelope, "choices": [choice]}]
            if chunk.finish_reason is not None and include_usage:
                events.append({**envelope, "choices": [], "usage": _usage(chunk).model_dump()})
            return events

        return StreamingResponse(_sse(chunks, stack, render), media_type="text/event-stream")
    text, last = await _collect(chunks, stack)
    return schemas.Completion(
        id=ident,
        created=created,
        model=GENERATION_MODEL,
        system_fingerprint=last.version,
        choices=[
            schemas.CompletionChoice(
                text=text, finish_reason=last.finish_reason, logprobs=answers.completion_logprobs(last.logprobs)
            )
        ],
        usage=_usage(last),
    )


# --- embeddings ---------------------------------------------------------------------------


@router.post(
    declare("/v1/embeddings", RoutePolicy("openai", ("text",), ingress=32, proxy=64)),
    response_model=schemas.EmbeddingList,
    responses=ERRORS,
    openapi_extra=_body(schemas.EmbeddingRequest),
)
async def embeddings(request: Request, dataplane: DataplaneDep, admission: AdmissionDep) -> schemas.EmbeddingList:
    """Sentence embeddings from the ``text`` model (unit length), as floats or base64 of float32s."""
    with admission.slot(request):
        body, _ = await read_body(request, schemas.EmbeddingRequest)
        _require(dataplane, body.model, EMBEDDING_MODEL, "embed text")
        result = await dataplane.embed(body.texts(), request.state.deadline)

    def encoded(vector: np.ndarray) -> list[float] | str:
        if body.encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return vector.tolist()

    return schemas.EmbeddingList(
        data=[schemas.Embedding(index=i, embedding=encoded(v)) for i, v in enumerate(result.vectors)],
        model=EMBEDDING_MODEL,
        usage=schemas.EmbeddingUsage(prompt_tokens=result.tokens, total_tokens=result.tokens),
    )


PATHS = tuple(route.path for route in router.routes)
"""The paths this router serves, whose errors are in OpenAI's shape."""
