"""The HTTP front door: a FastAPI app served by Ray Serve.

The ingress validates every request, decodes images once, and calls the model
deployments through ``DeploymentHandle``s. For a multimodal request the image
and text branches start together, and fusion receives their responses without
the ingress waiting in between: Serve resolves them as arguments.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import schemas
from deployments.errors import InvalidInput, MaasError, PayloadTooLarge, UnsupportedMediaType
from deployments.imaging import ImageSpec, decode_base64, decode_image, prepare
from deployments.scoring import top_k
from deployments.settings import limits
from monitoring.metrics import request_metrics

logger = logging.getLogger("ray.serve")

Model = TypeVar("Model", bound=BaseModel)

JSON = "application/json"
MULTIPART = "multipart/form-data"

DESCRIPTION = """
Multimodal inference on Ray Serve: an ImageNet image classifier (MobileNetV2),
a sentence encoder (all-MiniLM-L6-v2), and a fusion model that scores free-text
labels against an image, a text, or both.

Image-to-text scoring uses **ConSE** (Norouzi et al., 2014): the image's top
ImageNet class probabilities weight the text embeddings of those class names,
giving the image a point in the text-embedding space. It is not CLIP: an image
is only as describable as the 1000 ImageNet classes allow.

Routes that take an image accept JSON with the image base64-encoded, or a
multipart form with the file in field `image`. Errors are 4xx responses whose
`detail` lists what was wrong, in the same shape as validation errors.
"""

app = FastAPI(title="maas-cluster", version="0.1.0", description=DESCRIPTION)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template and status (plain ASGI, no body buffering)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        except Exception:
            status = 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            error_type = None
            if status >= 400:
                # Our handlers record the type of their first detail entry; responses Serve makes
                # itself (backpressure 503s, handled inside the app) are typed by status.
                error_type = scope.get("state", {}).get("error_type") or f"http_{status}"
            request_metrics().observe_request(route, status, time.perf_counter() - start, error_type)


app.add_middleware(RequestMetricsMiddleware)


def _error_response(request: Request, status: int, detail: list[dict], headers: dict | None = None) -> JSONResponse:
    request.state.error_type = detail[0]["type"] if detail else "error"
    return JSONResponse(status_code=status, content={"detail": jsonable_encoder(detail)}, headers=headers)


@app.exception_handler(MaasError)
async def _maas_error(request: Request, exc: MaasError) -> JSONResponse:
    return _error_response(request, exc.status_code, exc.detail())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Framework errors (unknown route, wrong method, a malformed form) in the same shape."""
    detail = [{"loc": [], "msg": str(exc.detail), "type": "http_error"}]
    return _error_response(request, exc.status_code, detail, exc.headers)


@app.exception_handler(ValidationError)
async def _validation_error(request: Request, exc: ValidationError) -> JSONResponse:
    errors = [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False)]
    return _error_response(request, 422, _without_input(errors))


@app.exception_handler(RequestValidationError)
async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(request, 422, _without_input(exc.errors()))


def _without_input(errors: list[dict]) -> list[dict]:
    """Validation errors without the offending input, which can be megabytes of base64."""
    cleaned = []
    for error in errors:
        entry = {"type": error["type"], "loc": list(error["loc"]), "msg": error["msg"]}
        if ctx := error.get("ctx"):
            entry["ctx"] = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in ctx.items()}
        cleaned.append(entry)
    return cleaned


# Serve itself answers BackPressureError (503 or 429 with Retry-After, per the
# deployment's backpressure_config) and DeploymentUnavailableError (503).


@app.exception_handler(RayActorError)
async def _replica_died(request: Request, exc: RayActorError) -> JSONResponse:
    detail = [{"loc": [], "msg": "a model replica stopped while serving this request; retry", "type": "unavailable"}]
    return _error_response(request, 503, detail, headers={"Retry-After": "1"})


@app.exception_handler(RayTaskError)
async def _remote_error(request: Request, exc: RayTaskError) -> JSONResponse:
    cause = exc.cause if isinstance(exc.cause, Exception) else None
    if isinstance(cause, MaasError):
        return await _maas_error(request, cause)
    logger.exception("Model call failed", exc_info=exc)
    detail = [{"loc": [], "msg": "internal error in a model replica", "type": "internal_error"}]
    return _error_response(request, 500, detail)


def _openapi_body(model: type[BaseModel], multipart: bool) -> dict:
    """OpenAPI request body for routes that parse the body themselves (JSON and/or form)."""
    schema = model.model_json_schema()
    content = {JSON: {"schema": schema}}
    if multipart:
        form = model.model_json_schema()
        form["properties"]["image"] = {"type": "string", "format": "binary", "description": "The image file."}
        content[MULTIPART] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


async def _read_body(request: Request, model: type[Model], multipart: bool = False) -> tuple[Model, bytes | None]:
    """Parse and validate a JSON body, or a multipart form where the route allows one.

    Returns the validated request and, for a multipart upload, the raw image bytes.
    """
    lim = limits()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > lim.max_request_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {lim.max_request_bytes} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()

    if content_type == JSON:
        body = await request.body()
        if len(body) > lim.max_request_bytes:
            raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {lim.max_request_bytes} bytes")
        return model.model_validate_json(body), None

    if content_type == MULTIPART and multipart:
        async with request.form(max_files=1, max_fields=lim.max_labels + 8) as form:
            fields: dict = {}
            image_bytes = None
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image":
                        raise InvalidInput(f"unexpected file field {key!r}; send the image in field 'image'", field=key)
                    image_bytes = await value.read(lim.max_image_bytes + 1)
                    if len(image_bytes) > lim.max_image_bytes:
                        raise PayloadTooLarge(
                            f"image is larger than the limit of {lim.max_image_bytes} bytes", field="image"
                        )
                elif key == "labels":
                    fields.setdefault("labels", []).append(value)
                elif key == "texts":
                    fields.setdefault("texts", []).append(value)
                else:
                    fields[key] = value
        if image_bytes is not None:
            fields["image"] = ""  # placeholder so the model's own check on the field passes
        return model.model_validate(fields), image_bytes

    accepted = f"{JSON} or {MULTIPART}" if multipart else JSON
    raise UnsupportedMediaType(f"Content-Type must be {accepted}; got {content_type or 'none'}")


@dataclass
class PreparedImage:
    pixels: np.ndarray  # (crop, crop, 3) uint8, ready for the vision model
    size_bytes: int  # encoded upload
    source_pixels: int  # width x height of the upload
    seconds: float  # to decode and prepare


def _decode_and_prepare(image_b64: str | None, image_bytes: bytes | None, spec: ImageSpec) -> PreparedImage:
    """CPU-bound, so it runs in a worker thread and the event loop keeps serving."""
    start = time.perf_counter()
    raw = image_bytes if image_bytes is not None else decode_base64(image_b64 or "", limits())
    image = decode_image(raw, limits())
    pixels = prepare(image, spec)
    return PreparedImage(pixels, len(raw), image.width * image.height, time.perf_counter() - start)


def _label_scores(pairs: list[tuple[str, float]]) -> list[schemas.LabelScore]:
    return [schemas.LabelScore(label=label, score=score) for label, score in pairs]


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    """HTTP ingress: validation, image decoding, and the request graph."""

    def __init__(self, vision: DeploymentHandle, text: DeploymentHandle, fusion: DeploymentHandle):
        self.vision = vision
        self.text = text
        self.fusion = fusion
        self._image_spec: ImageSpec | None = None
        self._image_spec_version: str | None = None  # the vision model version the geometry belongs to
        self.metrics = request_metrics()

    async def _pixels(self, route: str, image_b64: str | None, image_bytes: bytes | None) -> np.ndarray:
        """Decode, validate and prepare an image for the vision model (geometry only)."""
        if self._image_spec is None:
            self._image_spec, self._image_spec_version = await self.vision.geometry.remote()
        image = await asyncio.to_thread(_decode_and_prepare, image_b64, image_bytes, self._image_spec)
        self.metrics.observe_image(route, image.size_bytes, image.source_pixels, image.seconds)
        return image.pixels

    def _seen_vision_version(self, version: str) -> None:
        """A live model update can change the geometry: ask again once another version answers."""
        if version != self._image_spec_version:
            self._image_spec = None

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz(self) -> schemas.Health:
        return schemas.Health(status="ok")

    @app.get("/v1/models", response_model=schemas.ModelsResponse)
    async def models(self) -> schemas.ModelsResponse:
        calls = {"vision": self.vision, "text": self.text, "fusion": self.fusion}
        responses = {name: handle.info.remote() for name, handle in calls.items()}
        infos = [schemas.ModelInfo(deployment=name, **await r) for name, r in responses.items()]
        return schemas.ModelsResponse(models=infos)

    @app.post(
        "/v1/vision/classify",
        response_model=schemas.VisionClassifyResponse,
        openapi_extra=_openapi_body(schemas.VisionClassifyRequest, multipart=True),
    )
    async def vision_classify(self, request: Request) -> schemas.VisionClassifyResponse:
        body, upload = await _read_body(request, schemas.VisionClassifyRequest, multipart=True)
        pixels = await self._pixels("/v1/vision/classify", body.image, upload)
        result = await self.vision.classify.remote(pixels, body.top_k, body.embed)
        self._seen_vision_version(result.version)
        return schemas.VisionClassifyResponse(
            labels=_label_scores(result.labels),
            embedding=result.embedding.tolist() if result.embedding is not None else None,
            model=result.model,
            version=result.version,
        )

    @app.post(
        "/v1/text/embed",
        response_model=schemas.TextEmbedResponse,
        openapi_extra=_openapi_body(schemas.TextEmbedRequest, multipart=False),
    )
    async def text_embed(self, request: Request) -> schemas.TextEmbedResponse:
        body, _ = await _read_body(request, schemas.TextEmbedRequest)
        result = await self.text.embed.remote(body.texts)
        return schemas.TextEmbedResponse(
            embeddings=result.vectors.tolist(),
            dim=result.vectors.shape[1],
            model=result.model,
            version=result.version,
        )

    @app.post(
        "/v1/text/classify",
        response_model=schemas.TextClassifyResponse,
        openapi_extra=_openapi_body(schemas.TextClassifyRequest, multipart=False),
    )
    async def text_classify(self, request: Request) -> schemas.TextClassifyResponse:
        body, _ = await _read_body(request, schemas.TextClassifyRequest)
        result = await self.text.classify.remote(body.text, body.labels)
        return schemas.TextClassifyResponse(
            labels=_label_scores(result.labels), model=result.model, version=result.version
        )

    @app.post(
        "/v1/multimodal/analyze",
        response_model=schemas.MultimodalResponse,
        openapi_extra=_openapi_body(schemas.MultimodalRequest, multipart=True),
    )
    async def multimodal_analyze(self, request: Request) -> schemas.MultimodalResponse:
        body, upload = await _read_body(request, schemas.MultimodalRequest, multipart=True)
        has_image = upload is not None or body.image is not None
        if not has_image and body.text is None:
            raise InvalidInput("send an image, a text, or both")
        pixels = await self._pixels("/v1/multimodal/analyze", body.image, upload) if has_image else None

        # The graph: both branches start now and run in parallel; fusion takes
        # their responses as arguments, so it starts as soon as both are done.
        vision = self.vision.classify.remote(pixels, body.top_k) if has_image else None
        with_text = body.text is not None
        embeddings = self.text.embed_labels.remote(body.labels, body.text)
        fused = self.fusion.fuse.remote(vision, embeddings, with_text, body.vision_weight, body.text_weight)
        result = await fused

        def ranked(scores: np.ndarray) -> list[schemas.LabelScore]:
            return _label_scores(top_k(scores, body.labels, len(body.labels)))

        vision_branch = None
        if vision is not None:
            image = await vision
            self._seen_vision_version(image.version)
            vision_branch = schemas.VisionBranch(
                classes=_label_scores(image.labels),
                labels=ranked(result.vision_scores),
            )
        return schemas.MultimodalResponse(
            vision=vision_branch,
            text=schemas.TextBranch(labels=ranked(result.text_scores)) if with_text else None,
            fused=ranked(result.fused),
            weights=result.weights,
            method="conse+late-fusion",
        )
