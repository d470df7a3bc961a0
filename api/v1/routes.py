"""The ``/v1`` routes: this service's own API over the dataplane.

Each route parses its body (``bodies``), takes an admission slot, asks the dataplane and renders the domain
result in its response schema (``schemas``). Errors are ``{"detail": [{"loc", "msg", "type"}]}``, the shape
FastAPI gives validation errors, so clients parse one format.
"""

import asyncio
import base64

import numpy as np
from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.access import require_models
from api.context import AdmissionDep, DataplaneDep
from api.knowledge import render_decision, render_sources
from api.policy import RoutePolicy, declare
from api.problems import Problem
from api.v1 import schemas
from api.v1.bodies import JSON, MULTIPART, content_type, read_body, read_form
from deployments.contracts import SpeechRequest
from deployments.scoring import top_k
from deployments.settings import limits

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")

router = APIRouter()


def render_error(problem: Problem) -> JSONResponse:
    return JSONResponse(
        status_code=problem.status, content={"detail": jsonable_encoder(problem.detail)}, headers=problem.headers
    )


# --- OpenAPI: request bodies and the error responses of each route --------------

ERRORS = {
    400: "The multipart form is malformed or carries more than one file.",
    413: "The body or the image is larger than the limits.",
    415: "The Content-Type is not one the route accepts.",
    422: "A field is missing, malformed or out of its limits, or the image cannot be decoded; `detail` says which.",
    503: "Overloaded (the route's admission limit or a model's queue is full), or a model has no replica able to "
    "answer within the request's deadline (starting or updating). Retry after `Retry-After` seconds.",
    504: "The explanation took longer than the explainer's time budget (its `budget_s`) and was stopped.",
}


def responses(*statuses: int) -> dict:
    described: dict = {}
    for status in statuses:
        described[status] = {"model": schemas.ErrorResponse, "description": ERRORS[status]}
        if status == 503:
            described[status]["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            }
    return described


def _openapi_body(model: type[BaseModel], multipart: bool) -> dict:
    """OpenAPI request body for routes that parse the body themselves (JSON and/or form)."""
    content = {JSON: {"schema": model.model_json_schema()}}
    if multipart:
        encoding = {"image": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}}
        if "audio" in model.model_fields:
            encoding["audio"] = {"contentType": "audio/*, application/octet-stream"}
        content[MULTIPART] = {"schema": schemas.form_schema(model), "encoding": encoding}
    return {"requestBody": {"required": True, "content": content}}


def _post(
    path: str, policy: RoutePolicy, request: type[BaseModel], response: type[BaseModel], multipart: bool, *more: int
):
    return router.post(
        declare(path, policy),
        response_model=response,
        responses=responses(*((400,) if multipart else ()), 413, 415, 422, 503, *more),
        openapi_extra=_openapi_body(request, multipart=multipart),
    )


def _label_scores(pairs: list[tuple[str, float]]) -> list[schemas.LabelScore]:
    return [schemas.LabelScore(label=label, score=score) for label, score in pairs]


# --- routes -----------------------------------------------------------------------
# Each route's policy (api.policy) sits in its decorator. Admission limits are per ingress replica and per HTTP
# proxy (two ingress replicas behind one proxy in the shipped configs): vision's two replicas hold 2 x 16
# requests and queue 64 more, so the two image routes admit 96 between them, about 2.5 s of work at saturation
# on 2 cores; text routes are cheaper per request, explanations run one to a hundred model passes each.


@_post(
    "/v1/vision/classify",
    RoutePolicy("v1", ("vision",), ingress=24, proxy=48),
    schemas.VisionClassifyRequest,
    schemas.VisionClassifyResponse,
    multipart=True,
)
async def vision_classify(
    request: Request, dataplane: DataplaneDep, admission: AdmissionDep
) -> schemas.VisionClassifyResponse:
    route = "/v1/vision/classify"
    deadline = request.state.deadline
    with admission.slot(request):
        body, upload = await read_body(request, schemas.VisionClassifyRequest, multipart=True)
        synsets = dataplane.concepts(body.concepts or [])  # unknown concepts are refused before any work
        pixels = await dataplane.prepare_image(route, deadline, raw=upload, image_b64=body.image)
        result = await dataplane.classify(pixels, body.top_k, body.embed, deadline)
    concepts = None
    if body.concepts:
        probabilities = dataplane.rollups(result, synsets)
        concepts = [
            schemas.ConceptScore(
                concept=name, synset=synset.id, name=synset.name, definition=synset.definition,
                probability=probability, classes=len(dataplane.knowledge.classes_below(synset.id)),
            )
            for name, synset, probability in zip(body.concepts, synsets, probabilities)
        ]  # fmt: skip
    return schemas.VisionClassifyResponse(
        labels=_label_scores(result.labels),
        embedding=result.embedding.tolist() if result.embedding is not None else None,
        concepts=concepts,
        model=result.model,
        version=result.version,
        variant=result.variant,
    )


def _text_lines(result) -> list[schemas.TextLine]:
    return [schemas.TextLine(text=line.text, confidence=line.confidence, box=[list(p) for p in line.box])
            for line in result.lines]  # fmt: skip


@_post(
    "/v1/vision/ocr",
    RoutePolicy("v1", ("ocr",), ingress=16, proxy=32),
    schemas.OcrRequest,
    schemas.OcrResponse,
    multipart=True,
)
async def vision_ocr(request: Request, dataplane: DataplaneDep, admission: AdmissionDep) -> schemas.OcrResponse:
    """The lines of text in an image, in reading order, each with its confidence and box."""
    route = "/v1/vision/ocr"
    with admission.slot(request):
        body, upload = await read_body(request, schemas.OcrRequest, multipart=True)
        image = await dataplane.prepare_views(
            route, request.state.deadline, raw=upload, image_b64=body.image, vision=False, ocr=True
        )
        result = await dataplane.read_text(image, request.state.deadline)
    width, height = image.size
    return schemas.OcrResponse(
        lines=_text_lines(result), truncated=result.truncated, width=width, height=height,
        model=result.model, version=result.version,
    )  # fmt: skip


@_post(
    "/v1/multimodal/describe",
    RoutePolicy("v1", ("vision", "ocr", "llm"), ingress=16, proxy=32, timeout="long"),
    schemas.DescribeRequest,
    schemas.DescribeResponse,
    multipart=True,
)
async def multimodal_describe(
    request: Request, dataplane: DataplaneDep, admission: AdmissionDep
) -> schemas.DescribeResponse:
    """One or two sentences about an image, with the evidence they were written from.

    Not a trained captioning model: the image classifier (ImageNet classes) and OCR (text in the image) look at
    the image in parallel, and the language model is asked to describe it from their findings only. The
    evidence is returned so a client can check the description against it.
    """
    route = "/v1/multimodal/describe"
    with admission.slot(request):
        body, upload = await read_body(request, schemas.DescribeRequest, multipart=True)
        policy = dataplane.policy(body.policy)  # an unknown policy is refused before any work
        image = await dataplane.prepare_views(
            route, request.state.deadline, raw=upload, image_b64=body.image, vision=True, ocr=True
        )
        described = await dataplane.describe(
            image, body.max_tokens, request.state.deadline, policy, route, knowledge=body.knowledge
        )
    looked, last = described.looked, described.last
    return schemas.DescribeResponse(
        description=described.text,
        finish_reason=last.finish_reason,
        evidence=schemas.DescriptionEvidence(
            classes=_label_scores(looked.evidence.classes),
            text=_text_lines(looked.ocr),
            text_truncated=looked.evidence.text_truncated,
            prompt=looked.evidence.render(),
            knowledge=render_sources(looked.evidence.facts),
        ),
        policy=render_decision(described.decision, described.masked) if described.decision else None,
        models={
            "vision": f"{looked.vision.model} {looked.vision.version}",
            "ocr": f"{looked.ocr.model} {looked.ocr.version}",
            "llm": f"{last.model} {last.version}",
        },
        usage=schemas.DescribeUsage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
        seconds={name: round(value, 4) for name, value in described.seconds.items()},
        method="grounded-prompt: imagenet classes + ocr -> language model",
    )


ASK = "/v1/multimodal/ask"


@_post(
    ASK,
    RoutePolicy("v1", ("llm",), ("asr", "vision", "ocr", "tts"), ingress=8, proxy=16, timeout="long"),
    schemas.AskRequest,
    schemas.AskResponse,
    multipart=True,
)
async def multimodal_ask(request: Request, dataplane: DataplaneDep, admission: AdmissionDep) -> schemas.AskResponse:
    """A question, spoken and/or written, maybe about an image, answered; with `speak`, said back.

    The audio is heard (the `asr` model) while the vision and OCR models look at the image; the language model
    answers what was said (and written) from what they found, and the `tts` model says the answer. Each
    stage's time is in `seconds`. JSON with the files base64-encoded, or a multipart form with the files in
    fields `audio` and `image`.
    """
    deadline = request.state.deadline
    with admission.slot(request):
        body, files = await _ask_body(request)
        policy = dataplane.policy(body.policy)  # an unknown policy is refused before any work
        raw_audio, raw_image = files.get("audio"), files.get("image")
        has_audio = raw_audio is not None or body.audio is not None
        has_image = raw_image is not None or body.image is not None
        needed = {"asr"} if has_audio else set()
        needed |= {"vision", "ocr"} if has_image else set()
        needed |= {"tts"} if body.speak else set()
        require_models(request, needed)

        async def nothing():
            return None

        audio, image = await asyncio.gather(
            dataplane.prepare_audio(ASK, deadline, raw=raw_audio, audio_b64=body.audio, field="audio")
            if has_audio else nothing(),
            dataplane.prepare_views(ASK, deadline, raw=raw_image, image_b64=body.image, vision=True, ocr=True)
            if has_image else nothing(),
        )  # fmt: skip
        speak = SpeechRequest("", voice=body.voice, format=body.speech_format, whole=True) if body.speak else None
        answer = await dataplane.ask(
            body.text, audio, image, deadline, language=body.language, max_tokens=body.max_tokens,
            knowledge=body.knowledge, policy=policy, route=ASK, speak=speak,
        )  # fmt: skip
    return _ask_response(answer, body)


async def _ask_body(request: Request) -> tuple[schemas.AskRequest, dict[str, bytes]]:
    """An ask request: JSON (files base64-encoded) or a multipart form with files in fields audio and image."""
    if content_type(request) == MULTIPART:
        lim = limits()
        return await read_form(
            request, schemas.AskRequest, {"audio": lim.max_audio_bytes, "image": lim.max_image_bytes}
        )
    body, _ = await read_body(request, schemas.AskRequest)
    return body, {}


def _ask_response(answer, body: schemas.AskRequest) -> schemas.AskResponse:
    last, heard, looked = answer.last, answer.heard, answer.looked
    models = {"llm": f"{last.model} {last.version}"}
    transcript = evidence = speech = None
    if heard is not None:
        t = heard.transcript
        models["asr"] = f"{t.model} {t.version}"
        transcript = schemas.HeardSpeech(text=t.text, language=t.language, duration=t.duration)
    if looked is not None:
        models |= {"vision": f"{looked.vision.model} {looked.vision.version}",
                   "ocr": f"{looked.ocr.model} {looked.ocr.version}"}  # fmt: skip
        evidence = schemas.DescriptionEvidence(
            classes=_label_scores(looked.evidence.classes), text=_text_lines(looked.ocr),
            text_truncated=looked.evidence.text_truncated, prompt=looked.evidence.render(),
            knowledge=render_sources(looked.evidence.facts),
        )  # fmt: skip
    if answer.speech is not None:
        models["tts"] = answer.speech_model
        speech = schemas.SpokenAnswer(format=body.speech_format, audio=base64.b64encode(answer.speech).decode("ascii"),
                                      duration=round(answer.speech_seconds, 3))  # fmt: skip
    return schemas.AskResponse(
        question=answer.question,
        transcript=transcript,
        answer=answer.text,
        finish_reason=last.finish_reason,
        speech=speech,
        evidence=evidence,
        knowledge=render_sources(answer.facts) if body.knowledge else None,
        policy=render_decision(answer.decision, answer.masked) if answer.decision else None,
        models=models,
        usage=schemas.AskUsage(
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            audio_seconds_heard=heard.transcript.duration if heard else 0.0,
            audio_seconds_spoken=round(answer.speech_seconds, 3),
        ),  # fmt: skip
        seconds={name: round(value, 4) for name, value in answer.seconds.items()},
    )


@_post(
    "/v1/text/embed",
    RoutePolicy("v1", ("text",), ingress=32, proxy=64),
    schemas.TextEmbedRequest,
    schemas.TextEmbedResponse,
    multipart=False,
)
async def text_embed(request: Request, dataplane: DataplaneDep, admission: AdmissionDep) -> schemas.TextEmbedResponse:
    with admission.slot(request):
        body, _ = await read_body(request, schemas.TextEmbedRequest)
        result = await dataplane.embed(body.texts, request.state.deadline)
    return schemas.TextEmbedResponse(
        embeddings=result.vectors.tolist(), dim=result.vectors.shape[1], model=result.model, version=result.version
    )


@_post(
    "/v1/text/classify",
    RoutePolicy("v1", ("text",), ingress=32, proxy=64),
    schemas.TextClassifyRequest,
    schemas.TextClassifyResponse,
    multipart=False,
)
async def text_classify(
    request: Request, dataplane: DataplaneDep, admission: AdmissionDep
) -> schemas.TextClassifyResponse:
    with admission.slot(request):
        body, _ = await read_body(request, schemas.TextClassifyRequest)
        result = await dataplane.zero_shot(body.text, body.labels, request.state.deadline)
    return schemas.TextClassifyResponse(labels=_label_scores(result.labels), model=result.model, version=result.version)


@_post(
    "/v1/multimodal/analyze",
    RoutePolicy("v1", ("vision", "text", "fusion"), ingress=24, proxy=48),
    schemas.MultimodalRequest,
    schemas.MultimodalResponse,
    multipart=True,
)
async def multimodal_analyze(
    request: Request, dataplane: DataplaneDep, admission: AdmissionDep
) -> schemas.MultimodalResponse:
    route = "/v1/multimodal/analyze"
    with admission.slot(request):
        body, upload = await read_body(request, schemas.MultimodalRequest, multipart=True)
        policy = dataplane.policy(body.policy)  # an unknown policy is refused before any work
        pixels = None
        if upload is not None or body.image is not None:
            pixels = await dataplane.prepare_image(route, request.state.deadline, raw=upload, image_b64=body.image)
        analysis = await dataplane.analyze(
            pixels,
            body.text,
            body.labels,
            request.state.deadline,
            body.top_k,
            body.vision_weight,
            body.text_weight,
            explain=body.explain,
        )
    result = analysis.fusion

    def ranked(scores: np.ndarray) -> list[schemas.LabelScore]:
        return _label_scores(top_k(scores, body.labels, len(body.labels)))

    vision_branch = None
    if analysis.image is not None:
        vision_branch = schemas.VisionBranch(
            classes=_label_scores(analysis.image.labels), labels=ranked(result.vision_scores)
        )
    fused = ranked(result.fused)
    decision = None
    if policy is not None:
        images = [analysis.image] if analysis.image is not None else []
        labels = {item.label: item.score for item in fused}
        decision = render_decision(dataplane.judge(policy, route, images, labels=labels, input=body.text or ""), 0)
    return schemas.MultimodalResponse(
        vision=vision_branch,
        text=schemas.TextBranch(labels=ranked(result.text_scores)) if body.text is not None else None,
        fused=fused,
        weights=result.weights,
        policy=decision,
        explanation=_fusion_explanation(result, body.labels, fused) if body.explain else None,
        method="conse+late-fusion",
    )


def _fusion_explanation(result, labels: list[str], fused: list[schemas.LabelScore]) -> schemas.MultimodalExplanation:
    """How fusion made each label's score, best label first (``FusionExplanation``)."""
    explained, weights = result.explanation, result.weights
    index = {label: i for i, label in enumerate(labels)}
    rows = []
    for item in fused:
        j = index[item.label]
        parts, vision, text = {}, None, None
        if explained.vision_similarity is not None:
            parts["vision"] = weights["vision"] * float(result.vision_scores[j])
            order = np.argsort(-explained.class_contributions[:, j], kind="stable")
            vision = schemas.VisionPart(
                score=float(result.vision_scores[j]),
                similarity=float(explained.vision_similarity[j]),
                classes=[
                    schemas.ClassContribution(
                        label=explained.classes[t][0], contribution=float(explained.class_contributions[t, j])
                    )
                    for t in order
                ],
            )
        if explained.text_similarity is not None:
            parts["text"] = weights["text"] * float(result.text_scores[j])
            text = schemas.TextPart(score=float(result.text_scores[j]), similarity=float(explained.text_similarity[j]))
        rows.append(schemas.LabelExplanation(label=item.label, score=item.score, parts=parts, vision=vision, text=text))
    return schemas.MultimodalExplanation(
        method="exact: fused = sum of weight x score per modality; score = softmax(similarity / temperature); "
        "image similarity = sum of its ConSE classes' contributions",
        temperature=explained.temperature,
        weights=weights,
        classes=[schemas.ConseClass(label=name, probability=p, weight=w) for name, p, w in explained.classes],
        labels=rows,
    )


@_post(
    "/v1/vision/explain",
    RoutePolicy("v1", ("vision",), ingress=8, proxy=16),
    schemas.VisionExplainRequest,
    schemas.VisionExplainResponse,
    True,
    504,
)
async def vision_explain(
    request: Request, dataplane: DataplaneDep, admission: AdmissionDep
) -> schemas.VisionExplainResponse:
    """Where in the image the evidence for a class lies (the top class, or the one named in `label`).

    A saliency map over the centre crop the classifier sees (`region` places it in the image), as a coarse
    grid of shares and a heatmap PNG over the crop. Made by the explainer deployment, with its own copy of the
    vision model, within its time budget (504 past it).
    """
    route = "/v1/vision/explain"
    deadline = request.state.deadline
    with admission.slot(request):
        body, upload = await read_body(request, schemas.VisionExplainRequest, multipart=True)
        image = await dataplane.prepare_views(route, deadline, raw=upload, image_b64=body.image)
        result = await dataplane.explain_image(
            image.pixels, body.label, body.method, body.steps, body.grid, body.heatmap, deadline
        )
    return schemas.VisionExplainResponse(
        explained=schemas.ExplainedClass(label=result.class_name, index=result.class_index,
                                         probability=result.probability),
        method=result.method,
        parameters=result.parameters,
        grid=[[float(f"{share:.4g}") for share in row] for row in result.grid.tolist()],
        heatmap_png=base64.b64encode(result.heatmap_png).decode("ascii") if result.heatmap_png else None,
        region=list(dataplane.crop_region(image)),
        model=result.model,
        version=result.version,
        seconds=round(result.seconds, 4),
    )  # fmt: skip


@_post(
    "/v1/text/explain",
    RoutePolicy("v1", ("text",), ingress=8, proxy=16),
    schemas.TextExplainRequest,
    schemas.TextExplainResponse,
    False,
    504,
)
async def text_explain(
    request: Request, dataplane: DataplaneDep, admission: AdmissionDep
) -> schemas.TextExplainResponse:
    """Why a text gets a zero-shot label: each word's contribution to the label's score (occlusion: the score
    of the whole text minus the score without the word). The top label by default, or the one named."""
    with admission.slot(request):
        body, _ = await read_body(request, schemas.TextExplainRequest)
        result = await dataplane.explain_text(body.text, body.labels, body.label, request.state.deadline)
    ranking = sorted(range(len(result.words)), key=lambda i: -result.words[i].contribution)
    return schemas.TextExplainResponse(
        label=result.label,
        score=result.score,
        words=[schemas.WordScore(word=w.word, start=w.start, contribution=w.contribution) for w in result.words],
        ranking=[result.words[i].word for i in ranking],
        method=result.method,
        parameters=result.parameters,
        model=result.model,
        version=result.version,
        seconds=round(result.seconds, 4),
    )


@router.get(declare("/v1/policies", RoutePolicy("v1")), response_model=schemas.PoliciesResponse)
async def policies(dataplane: DataplaneDep) -> schemas.PoliciesResponse:
    """The policies a request can name: each rule's id, action and priority (never its condition)."""
    return schemas.PoliciesResponse(
        policies=[
            schemas.PolicySummary(
                name=name, description=compiled.policy.description, concepts=list(compiled.concepts),
                rules=[schemas.PolicyRule(id=r.rule.id, action=r.rule.kind, priority=r.rule.priority)
                       for r in compiled.rules],
            )
            for name, compiled in sorted(dataplane.policies.items())
        ],
        update_error=dataplane.policy_update_error,
    )  # fmt: skip
