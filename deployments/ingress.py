"""The HTTP front door: a FastAPI app served by Ray Serve.

The ingress validates every request, decodes images once, and calls the model
deployments through ``DeploymentHandle``s. For a multimodal request the image
and text branches start together, and fusion receives their responses without
the ingress waiting in between: Serve resolves them as arguments.

Around that: admission control per route (``admission``), a deadline per
request within which model calls are made and, where a replica stopped, made
again (``downstream``), and every failure answered with its status and a body
in one shape, all of them documented in the OpenAPI schema.
"""

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ReplicaState
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from deployments import schemas
from deployments.admission import Admission
from deployments.downstream import Deadline, api_error, call_models
from deployments.errors import InvalidInput, MaasError, PayloadTooLarge, UnsupportedMediaType
from deployments.imaging import ImageSpec, decode_base64, decode_image, prepare
from deployments.proxy import RECEIVED_AT_HEADER, REQUEST_TIMEOUT_HEADER  # the proxy sets or filters them
from deployments.scoring import top_k
from deployments.settings import limits
from monitoring.metrics import request_metrics

logger = logging.getLogger("ray.serve")

Model = TypeVar("Model", bound=BaseModel)

JSON = "application/json"
MULTIPART = "multipart/form-data"

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")

# The header Serve's proxy reads for a per-request timeout; a client may only shorten the configured one.

DESCRIPTION = """
Multimodal inference on Ray Serve: an ImageNet image classifier (MobileNetV2),
a sentence encoder (all-MiniLM-L6-v2), and a fusion model that scores free-text
labels against an image, a text, or both.

Image-to-text scoring uses **ConSE** (Norouzi et al., 2014): the image's top
ImageNet class probabilities weight the text embeddings of those class names,
giving the image a point in the text-embedding space. It is not CLIP: an image
is only as describable as the 1000 ImageNet classes allow.

Routes that take an image accept JSON with the image base64-encoded, or a
multipart form with the file in field `image`. Errors are 4xx or 5xx responses
whose `detail` lists what was wrong, in the same shape as validation errors.
A `503` carries `Retry-After`: the service is overloaded, starting or
updating, and the same request may succeed later. `GET /readyz` answers `200`
once every model can serve; `GET /healthz` only says the ingress is alive.
"""

app = FastAPI(title="maas-cluster", version="0.1.0", description=DESCRIPTION)


class IngressConfig(BaseModel):
    """The ingress's ``user_config``: timeouts and admission limits, live-tunable."""

    model_config = ConfigDict(extra="forbid")

    request_timeout_s: float = Field(
        30.0,
        gt=1.0,
        le=3600.0,
        description="The HTTP proxy's http_options.request_timeout_s; keep them equal. Model calls are given up "
        "a second before it, so the client gets this service's 503 rather than the proxy's 408.",
    )
    admission: dict[str, int] = Field(
        default_factory=lambda: {
            "/v1/vision/classify": 24,
            "/v1/multimodal/analyze": 24,
            "/v1/text/embed": 32,
            "/v1/text/classify": 32,
        },
        description="Requests in flight per route at one ingress replica; the next one gets 503 at once.",
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of admission refusals.")
    max_concurrent_decodes: int = Field(
        2, ge=1, le=64, description="Images decoded at once per ingress replica (bounds the ingress's memory)."
    )
    readiness_timeout_s: float = Field(2.0, gt=0.0, le=60.0, description="How long /readyz waits for each model.")

    @model_validator(mode="after")
    def _known_routes(self) -> "IngressConfig":
        unknown = set(self.admission) - set(ADMITTED_ROUTES)
        if unknown:
            raise ValueError(f"admission names unknown routes {sorted(unknown)}; known: {sorted(ADMITTED_ROUTES)}")
        if any(limit < 1 for limit in self.admission.values()):
            raise ValueError("admission limits must be at least 1")
        return self


ADMITTED_ROUTES = ("/v1/vision/classify", "/v1/multimodal/analyze", "/v1/text/embed", "/v1/text/classify")


def request_timeout(scope: dict, configured_s: float) -> float:
    """The request's timeout: the configured one, or shorter where the client asked for less."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_TIMEOUT_HEADER:
            try:
                asked = float(value)
            except ValueError:
                break
            if math.isfinite(asked) and 0 < asked < configured_s:
                return asked
            break
    return configured_s


def waited_at_proxy(scope: dict, timeout_s: float) -> float:
    """Seconds since the proxy received the request (its ``x-maas-received-at``), within ``[0, timeout_s]``.

    0 where the header is missing or malformed (a proxy without
    ``deployments.proxy``). The proxy may run on another node; the clamp keeps
    clock skew from stretching a deadline or ending it early by more than it.
    """
    for name, value in scope.get("headers", ()):
        if name == RECEIVED_AT_HEADER:
            try:
                waited = time.time() - float(value)
            except ValueError:
                return 0.0
            return min(max(waited, 0.0), timeout_s) if math.isfinite(waited) else 0.0
    return 0.0


_serve_status_lock = threading.Lock()
CONTROLLER_TIMEOUT_S = 5.0
"""How long /readyz waits for the Serve controller when a model did not answer it in time."""


async def running_replicas(handles: list[DeploymentHandle], timeout_s: float = CONTROLLER_TIMEOUT_S) -> dict[str, int]:
    """Replicas in state RUNNING (started, model loaded, health checks passing) per deployment of ``handles``,
    from the Serve controller; ``{}`` if it does not answer within ``timeout_s``."""

    def status():
        # serve.status() is not thread-safe in Ray 2.60, and a call that timed out may still be running.
        with _serve_status_lock:
            return serve.status()

    try:
        applications = (await asyncio.wait_for(asyncio.to_thread(status), timeout=timeout_s)).applications
    except Exception as exc:  # noqa: BLE001 - no answer is no evidence
        logger.warning("The Serve controller did not tell the replicas' states (%s)", type(exc).__name__)
        return {}
    running = {}
    for handle in handles:
        application = applications.get(handle.app_name)
        deployment = application.deployments.get(handle.deployment_name) if application else None
        if deployment is not None:
            running[handle.deployment_name] = deployment.replica_states.get(ReplicaState.RUNNING, 0)
    return running


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template and status (plain ASGI, no body buffering).

    Gives each request its ``Deadline`` (``request.state.deadline``), counted
    from when the proxy received it, and a ``Server-Timing`` header with the
    time spent in the ingress. A request the proxy cancels is counted as
    ``408`` if it ran into its timeout (the proxy answered the client 408) and
    ``499`` otherwise (the client went away, as nginx logs it), never as ``500``.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        timeout_s = request_timeout(scope, scope["app"].state.request_timeout_s)
        waited_s = waited_at_proxy(scope, timeout_s)
        scope.setdefault("state", {})["deadline"] = Deadline(timeout_s - waited_s)
        status = None

        async def send_and_record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                timing = f"ingress;dur={(time.perf_counter() - start) * 1000:.1f}".encode()
                message["headers"] = [*message.get("headers", []), (b"server-timing", timing)]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        except (asyncio.CancelledError, TaskCancelledError):
            # The proxy cancels the request; a body read waiting on the proxy sees it as Ray's TaskCancelledError.
            if status is None:
                status = 408 if waited_s + time.perf_counter() - start >= timeout_s - 0.05 else 499
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            status = status or 500
            error_type = None
            if status >= 400:
                # Our handlers record the type of their first detail entry; the rest are typed by status.
                error_type = scope["state"].get("error_type") or f"http_{status}"
            request_metrics().observe_request(route, status, time.perf_counter() - start, error_type)


app.add_middleware(RequestMetricsMiddleware)
app.state.request_timeout_s = IngressConfig().request_timeout_s


def _error_response(request: Request, status: int, detail: list[dict], headers: dict | None = None) -> JSONResponse:
    request.state.error_type = detail[0]["type"] if detail else "error"
    return JSONResponse(status_code=status, content={"detail": jsonable_encoder(detail)}, headers=headers)


@app.exception_handler(MaasError)
async def _maas_error(request: Request, exc: MaasError) -> JSONResponse:
    return _error_response(request, exc.status_code, exc.detail(), exc.headers())


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


@app.exception_handler(ClientDisconnect)
async def _client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
    """The client hung up while its body was being read (Serve passes the hang-up on): 499, as nginx logs it.

    Nobody reads this response; it is there so the request is counted as what it was, not as a 500.
    """
    request.state.error_type = "client_disconnected"
    return Response(status_code=499)


@app.exception_handler(RayActorError)
@app.exception_handler(RayTaskError)
async def _model_call_failed(request: Request, exc: Exception) -> JSONResponse:
    """A model call that ``downstream.call_models`` did not turn into an API error: a bug, so a logged 500."""
    if (error := api_error(exc)) is not None:
        return await _maas_error(request, error)
    logger.exception("Model call failed", exc_info=exc)
    detail = [{"loc": [], "msg": "internal error in a model replica", "type": "internal_error"}]
    return _error_response(request, 500, detail)


# --- OpenAPI: request bodies and the error responses of each route --------------

_ERRORS = {
    400: "The multipart form is malformed or carries more than one file.",
    413: "The body or the image is larger than the limits.",
    415: "The Content-Type is not one the route accepts.",
    422: "A field is missing, malformed or out of its limits, or the image cannot be decoded; `detail` says which.",
    503: "Overloaded (the route's admission limit or a model's queue is full), or a model has no replica able to "
    "answer within the request's deadline (starting or updating). Retry after `Retry-After` seconds.",
}


def _responses(*statuses: int) -> dict:
    responses: dict = {}
    for status in statuses:
        responses[status] = {"model": schemas.ErrorResponse, "description": _ERRORS[status]}
        if status == 503:
            responses[status]["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            }
    return responses


def _openapi_body(model: type[BaseModel], multipart: bool) -> dict:
    """OpenAPI request body for routes that parse the body themselves (JSON and/or form)."""
    content = {JSON: {"schema": model.model_json_schema()}}
    if multipart:
        content[MULTIPART] = {
            "schema": schemas.form_schema(model),
            "encoding": {"image": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}},
        }
    return {"requestBody": {"required": True, "content": content}}


def _post(path: str, request: type[BaseModel], response: type[BaseModel], multipart: bool):
    return app.post(
        path,
        response_model=response,
        responses=_responses(*((400,) if multipart else ()), 413, 415, 422, 503),
        openapi_extra=_openapi_body(request, multipart=multipart),
    )


# --- request bodies ---------------------------------------------------------------


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, but a text field that is not valid in its charset is refused.

    Starlette falls back to Latin-1 for such fields, which would silently turn a
    client's broken UTF-8 into other text.
    """

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                raise InvalidInput(f"form field is not valid {self._charset} text", field=part.field_name) from None
        super().on_part_end()


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
        return model.model_validate_json(body, strict=True), None

    if content_type == MULTIPART and multipart:
        return await _read_form(request, model)

    accepted = f"{JSON} or {MULTIPART}" if multipart else JSON
    raise UnsupportedMediaType(f"Content-Type must be {accepted}")


async def _read_form(request: Request, model: type[Model]) -> tuple[Model, bytes | None]:
    lim = limits()
    parser = StrictMultiPartParser(request.headers, request.stream(), max_files=1, max_fields=lim.max_labels + 8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # a malformed form, too many files or fields
        raise StarletteHTTPException(status_code=400, detail=exc.message) from None
    try:
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
            elif key in ("labels", "texts"):
                fields.setdefault(key, []).append(value)
            elif key in fields:
                raise InvalidInput(f"form field {key!r} is given more than once", field=key)
            else:
                fields[key] = value
    finally:
        await form.close()
    if image_bytes is not None:
        fields["image"] = schemas.IMAGE_PLACEHOLDER  # so the model's own check on the field passes
    return model.from_form(fields), image_bytes


# --- images -----------------------------------------------------------------------


@dataclass
class PreparedImage:
    pixels: np.ndarray  # (crop, crop, 3) uint8, ready for the vision model
    size_bytes: int  # encoded upload
    source_pixels: int  # width x height of the upload
    seconds: float  # to decode and prepare


def _decode_and_prepare(image_b64: str | None, image_bytes: bytes | None, spec: ImageSpec) -> PreparedImage:
    """CPU-bound, so it runs in the ingress's decode threads and the event loop keeps serving."""
    start = time.perf_counter()
    raw = image_bytes if image_bytes is not None else decode_base64(image_b64 or "", limits())
    image = decode_image(raw, limits())
    pixels = prepare(image, spec)
    return PreparedImage(pixels, len(raw), image.width * image.height, time.perf_counter() - start)


def _label_scores(pairs: list[tuple[str, float]]) -> list[schemas.LabelScore]:
    return [schemas.LabelScore(label=label, score=score) for label, score in pairs]


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1}, user_config={})
@serve.ingress(app)
class Ingress:
    """HTTP ingress: validation, image decoding, admission, and the request graph."""

    def __init__(self, vision: DeploymentHandle, text: DeploymentHandle, fusion: DeploymentHandle):
        self.vision = vision
        self.text = text
        self.fusion = fusion
        self.models = {"vision": vision, "text": text, "fusion": fusion}
        self.config = IngressConfig()
        self._configured = False
        self.admission = Admission(self.config.admission, self.config.retry_after_s)
        self._decoder = ThreadPoolExecutor(self.config.max_concurrent_decodes, thread_name_prefix="decode")
        self._image_spec: ImageSpec | None = None
        self._image_spec_version: str | None = None  # the vision model version the geometry belongs to
        self.metrics = request_metrics()

    def reconfigure(self, user_config: dict) -> None:
        try:
            config = IngressConfig.model_validate(user_config or {})
        except ValidationError as exc:
            if not self._configured:
                raise  # fail this replica's start: the deploy reports the error
            logger.error("Kept the current ingress settings; the new ones are invalid: %s", exc)
            return
        if config.max_concurrent_decodes != self.config.max_concurrent_decodes:
            previous, self._decoder = (
                self._decoder,
                ThreadPoolExecutor(config.max_concurrent_decodes, thread_name_prefix="decode"),
            )
            previous.shutdown(wait=False)
        self.admission.configure(config.admission, config.retry_after_s)
        app.state.request_timeout_s = config.request_timeout_s
        self.config, self._configured = config, True

    async def _pixels(self, route: str, image_b64: str | None, image_bytes: bytes | None, deadline: Deadline):
        """Decode, validate and prepare an image for the vision model (geometry only)."""
        if self._image_spec is None:
            self._image_spec, self._image_spec_version = await call_models(self.vision.geometry.remote, deadline)
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self._decoder, _decode_and_prepare, image_b64, image_bytes, self._image_spec)
        self.metrics.observe_image(route, image.size_bytes, image.source_pixels, image.seconds)
        return image.pixels

    def _seen_vision_version(self, version: str) -> None:
        """A live model update can change the geometry: ask again once another version answers."""
        if version != self._image_spec_version:
            self._image_spec = None

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz(self) -> schemas.Health:
        """Liveness: the ingress answers. It says nothing about the models; see /readyz."""
        return schemas.Health(status="ok")

    @app.get(
        "/readyz",
        response_model=schemas.Readiness,
        responses={503: {"model": schemas.Readiness, "description": "Some model cannot serve yet."}},
    )
    async def readyz(self, response: Response) -> schemas.Readiness:
        """Readiness: 200 once every model deployment has a replica with its model loaded, else 503.

        Each model is asked directly, for up to ``readiness_timeout_s``. One that does not answer in time is
        asked about at the Serve controller (up to ``CONTROLLER_TIMEOUT_S`` more): under load its replicas'
        queues are full, and a model that is busy serving is ready.
        """
        calls = {name: handle.ready.remote() for name, handle in self.models.items()}
        deadline = time.monotonic() + self.config.readiness_timeout_s
        deployments = {}
        silent = []
        for name, call in calls.items():
            try:
                answer = await asyncio.wait_for(call, timeout=max(0.0, deadline - time.monotonic()))
                deployments[name] = schemas.DeploymentReadiness(ready=True, **answer)
            except TimeoutError:
                silent.append(name)
            except Exception as exc:  # noqa: BLE001 - any failure means not ready; the type says which
                deployments[name] = schemas.DeploymentReadiness(ready=False, message=type(exc).__name__)
        if silent:
            running = await running_replicas([self.models[name] for name in silent])
            for name in silent:
                replicas = running.get(self.models[name].deployment_name, 0)
                message = f"no replica answered within {self.config.readiness_timeout_s} s"
                if replicas:
                    message = f"busy: {message}; {replicas} replicas running"
                deployments[name] = schemas.DeploymentReadiness(ready=replicas > 0, message=message)
        deployments = {name: deployments[name] for name in self.models}
        ready = all(d.ready for d in deployments.values())
        response.status_code = 200 if ready else 503
        return schemas.Readiness(status="ready" if ready else "not_ready", deployments=deployments)

    @app.get("/v1/models", response_model=schemas.ModelsResponse, responses=_responses(503))
    async def models(self, request: Request) -> schemas.ModelsResponse:
        async def infos() -> list[dict]:
            responses = {name: handle.info.remote() for name, handle in self.models.items()}
            return [{"deployment": name, **await r} for name, r in responses.items()]

        return schemas.ModelsResponse(
            models=[schemas.ModelInfo(**info) for info in await call_models(infos, request.state.deadline)]
        )

    @_post("/v1/vision/classify", schemas.VisionClassifyRequest, schemas.VisionClassifyResponse, multipart=True)
    async def vision_classify(self, request: Request) -> schemas.VisionClassifyResponse:
        route, deadline = "/v1/vision/classify", request.state.deadline
        with self.admission.slot(route):
            body, upload = await _read_body(request, schemas.VisionClassifyRequest, multipart=True)
            pixels = await self._pixels(route, body.image, upload, deadline)
            result = await call_models(lambda: self.vision.classify.remote(pixels, body.top_k, body.embed), deadline)
        self._seen_vision_version(result.version)
        return schemas.VisionClassifyResponse(
            labels=_label_scores(result.labels),
            embedding=result.embedding.tolist() if result.embedding is not None else None,
            model=result.model,
            version=result.version,
        )

    @_post("/v1/text/embed", schemas.TextEmbedRequest, schemas.TextEmbedResponse, multipart=False)
    async def text_embed(self, request: Request) -> schemas.TextEmbedResponse:
        route = "/v1/text/embed"
        with self.admission.slot(route):
            body, _ = await _read_body(request, schemas.TextEmbedRequest)
            result = await call_models(lambda: self.text.embed.remote(body.texts), request.state.deadline)
        return schemas.TextEmbedResponse(
            embeddings=result.vectors.tolist(),
            dim=result.vectors.shape[1],
            model=result.model,
            version=result.version,
        )

    @_post("/v1/text/classify", schemas.TextClassifyRequest, schemas.TextClassifyResponse, multipart=False)
    async def text_classify(self, request: Request) -> schemas.TextClassifyResponse:
        route = "/v1/text/classify"
        with self.admission.slot(route):
            body, _ = await _read_body(request, schemas.TextClassifyRequest)
            result = await call_models(
                lambda: self.text.classify.remote(body.text, body.labels), request.state.deadline
            )
        return schemas.TextClassifyResponse(
            labels=_label_scores(result.labels), model=result.model, version=result.version
        )

    @_post("/v1/multimodal/analyze", schemas.MultimodalRequest, schemas.MultimodalResponse, multipart=True)
    async def multimodal_analyze(self, request: Request) -> schemas.MultimodalResponse:
        route, deadline = "/v1/multimodal/analyze", request.state.deadline
        with self.admission.slot(route):
            body, upload = await _read_body(request, schemas.MultimodalRequest, multipart=True)
            has_image = upload is not None or body.image is not None
            pixels = await self._pixels(route, body.image, upload, deadline) if has_image else None
            with_text = body.text is not None

            async def graph():
                # Both branches start now and run in parallel; fusion takes their
                # responses as arguments, so it starts as soon as both are done.
                vision = self.vision.classify.remote(pixels, body.top_k) if has_image else None
                embeddings = self.text.embed_labels.remote(body.labels, body.text)
                fused = self.fusion.fuse.remote(vision, embeddings, with_text, body.vision_weight, body.text_weight)
                return await fused, (await vision if vision is not None else None)

            result, image = await call_models(graph, deadline)

        def ranked(scores: np.ndarray) -> list[schemas.LabelScore]:
            return _label_scores(top_k(scores, body.labels, len(body.labels)))

        vision_branch = None
        if image is not None:
            self._seen_vision_version(image.version)
            vision_branch = schemas.VisionBranch(
                classes=_label_scores(image.labels), labels=ranked(result.vision_scores)
            )
        return schemas.MultimodalResponse(
            vision=vision_branch,
            text=schemas.TextBranch(labels=ranked(result.text_scores)) if with_text else None,
            fused=ranked(result.fused),
            weights=result.weights,
            method="conse+late-fusion",
        )
