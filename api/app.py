"""The FastAPI app: the routers of every protocol over one dataplane, and errors in each protocol's shape.

``build_app`` is a plain function of its collaborators, so the ingress deployment serves what it returns and a
unit test builds the same app with a fake dataplane and no Ray.
"""

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from api import admin, health
from api.access import AccessMiddleware, Guard, document
from api.audit import Audit, AuditMiddleware
from api.context import ApiSettings
from api.middleware import RequestMetricsMiddleware
from api.openai import audio, rerank
from api.openai import routes as openai
from api.policy import OPEN, declare
from api.problems import HANDLED, Problem, problem
from api.v1 import routes as v1
from api.v2 import routes as v2
from deployments.admission import Admission
from monitoring.metrics import RequestMetrics
from pipelines.dataplane import Dataplane
from pipelines.privacy import Privacy

DESCRIPTION = """
Multimodal inference on Ray Serve: an ImageNet image classifier (MobileNetV2),
a sentence encoder (all-MiniLM-L6-v2), a fusion model that scores free-text
labels against an image, a text, or both, and a language model
(SmolLM2-135M-Instruct) with continuous batching and streaming.

Image-to-text scoring uses **ConSE** (Norouzi et al., 2014): the image's top
ImageNet class probabilities weight the text embeddings of those class names,
giving the image a point in the text-embedding space. It is not CLIP: an image
is only as describable as the 1000 ImageNet classes allow.

Three protocols reach the same models:

* `/v1/...`, this service's API. Routes that take an image accept JSON with the
  image base64-encoded, or a multipart form with the file in field `image`.
  Errors are 4xx or 5xx responses whose `detail` lists what was wrong, in the
  same shape as validation errors.
* OpenAI's API: `POST /v1/chat/completions` and `/v1/completions` (model
  `llm`; `stream: true` gives Server-Sent Events; structured outputs with
  `response_format`, tool calls with `tools`, log probabilities, all held by
  constrained decoding where they constrain), `POST /v1/embeddings`,
  `/v1/rerank` and `/v1/score` (model `text`), the audio routes, and
  `GET /v1/models`, which lists every model. Errors are
  `{"error": {"message", "type", "param", "code"}}`.
* `/v2/...`, the Open Inference Protocol (KServe v2, Triton's HTTP API), with
  JSON tensors and the binary tensor data extension. Errors are `{"error": "..."}`.

A `503` carries `Retry-After`: the service is overloaded, starting or
updating, and the same request may succeed later. `GET /readyz` answers `200`
once every model can serve; `GET /healthz` only says the ingress is alive.
"""


@dataclass(frozen=True)
class Protocol:
    """A router and how it renders errors, for the paths under its ``prefixes`` (none: every other path)."""

    prefixes: tuple[str, ...]
    router: APIRouter
    render_error: Callable[[Problem], Response]

    def owns(self, path: str) -> bool:
        return not self.prefixes or any(path == p or path.startswith(p + "/") for p in self.prefixes)


PROTOCOLS = (
    Protocol(("/v2",), v2.router, v2.render_error),
    Protocol(openai.PATHS, openai.router, openai.render_error),
    Protocol(audio.PATHS, audio.router, openai.render_error),
    Protocol(rerank.PATHS, rerank.router, openai.render_error),
    Protocol((), health.router, v1.render_error),
    Protocol((), admin.router, v1.render_error),
    Protocol((), v1.router, v1.render_error),
)


# FastAPI's own routes: the API's description, open to all.
for _path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
    declare(_path, OPEN)


def allowed_methods(path: str) -> list[str]:
    """The methods of the route template a request to ``path`` with another method matched (the first one, as
    Starlette's router takes it), from every route declared on that template."""
    routes = [route for protocol in PROTOCOLS for route in protocol.router.routes]
    template = next((route.path for route in routes if route.path_regex.match(path)), None)
    return sorted({method for route in routes if route.path == template for method in route.methods or ()})


def protocol_of(path: str) -> Protocol:
    return next(p for p in PROTOCOLS if p.owns(path))


def build_app(
    dataplane: Dataplane,
    admission: Admission,
    settings: ApiSettings,
    metrics: RequestMetrics,
    guard: Guard | None = None,
    audit: Audit | None = None,
    privacy: Privacy | None = None,
) -> FastAPI:
    """The app; ``guard`` checks API keys and limits (default: none), ``audit`` writes the audit trail."""
    app = FastAPI(title="maas-cluster", version="0.1.0", description=DESCRIPTION)
    app.state.dataplane, app.state.admission, app.state.settings = dataplane, admission, settings
    # Outermost last: the request's deadline and metrics, then its audit line, then access control.
    # FastAPI's own routes (/openapi.json, /docs) and every protocol's, for access control to match requests to.
    routes = [route for route in app.router.routes if isinstance(route, Route)]
    routes += [route for protocol in PROTOCOLS for route in protocol.router.routes]
    app.add_middleware(AccessMiddleware, guard=guard or Guard(), routes=routes, privacy=privacy,
                       render=lambda path, answer: protocol_of(path).render_error(answer))  # fmt: skip
    app.add_middleware(AuditMiddleware, audit=audit or Audit())
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, settings=settings)
    for protocol in PROTOCOLS:
        app.include_router(protocol.router)
    describe = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document(describe())
        return app.openapi_schema

    app.openapi = openapi

    async def render(request: Request, exc: Exception) -> Response:
        answer = problem(exc)
        if answer.status == 405:  # Starlette names the first route of the path's methods; a path has more
            answer.headers = {**(answer.headers or {}), "Allow": ", ".join(allowed_methods(request.url.path))}
        request.state.error_type = answer.type
        return protocol_of(request.url.path).render_error(answer)

    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        """The client hung up while its body was being read: 499, as nginx logs it. Nobody reads it; it is
        there so the request is counted as what it was, not as a 500."""
        request.state.error_type = "client_disconnected"
        return Response(status_code=499)

    # Everything a route may raise, the framework's own errors (unknown route, wrong method) included;
    # ``Exception`` catches bugs, which become a logged 500 that reveals nothing.
    for exc_type in HANDLED:
        app.add_exception_handler(exc_type, render)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, render)
    return app
