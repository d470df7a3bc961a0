"""The Open Inference Protocol's REST routes (``/v2``) over the dataplane.

Server and model metadata, liveness and readiness, and inference with JSON tensors or the binary tensor
data extension, for every model of ``models.MODELS`` that the registry holds; and, as KServe routes
``:explain`` beside ``:predict``, an explain route for each model of ``explainers.EXPLAINERS``, with the same
tensors in and the explanation out. Errors are the spec's
``{"error": "..."}``: 400 for a request that does not fit the model (validation included), 404 for an
unknown model or version, and this service's 413, 415 and 503 (with ``Retry-After``) as on ``/v1``.
"""

import dataclasses
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.body import read_bytes
from api.context import AdmissionDep, DataplaneDep, SettingsDep
from api.openapi import inline
from api.policy import OPEN, PATH_MODEL, RoutePolicy, declare
from api.problems import Problem
from api.v2 import schemas
from api.v2.explainers import EXPLAINERS
from api.v2.models import MODELS, Element, TensorModel
from api.v2.tensors import (
    DATATYPES,
    HEADER_LENGTH,
    BadTensor,
    bytes_elements,
    flatten,
    join_body,
    numbers_from_binary,
    numbers_from_json,
    output_data,
    split_body,
)
from deployments.downstream import Deadline, call_models
from deployments.errors import UnsupportedMediaType
from deployments.settings import limits
from pipelines.dataplane import Dataplane
from pipelines.registry import UnknownModel

SERVER = schemas.ServerMetadata(name="maas-cluster", version="0.1.0", extensions=["binary_tensor_data"])

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


def render_error(problem: Problem) -> JSONResponse:
    status = 400 if problem.status == 422 else problem.status  # the spec's status for a request that does not fit
    return JSONResponse(status_code=status, content={"error": problem.message()}, headers=problem.headers)


ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "The request does not fit the model; `error` says how."},
    404: {"model": schemas.ErrorResponse, "description": "No such model, or not this version."},
    503: {"model": schemas.ErrorResponse, "description": "Overloaded, starting or updating: retry after Retry-After."},
}


def tensor_model(name: str, dataplane: Dataplane) -> TensorModel:
    """The model ``name`` of the registry, as the protocol sees it (404 if there is none)."""
    dataplane.models[name]  # raises UnknownModel with the registry's names
    if name not in MODELS:
        raise UnknownModel(f"model {name!r} is not served over the Open Inference Protocol")
    return MODELS[name]


async def require_version(name: str, dataplane: Dataplane, deadline: Deadline, asked: str) -> None:
    """404 unless a replica of ``name`` serves version ``asked``."""
    answer = await call_models(lambda: dataplane.models[name].ready.remote(), deadline)
    check_version(name, answer["version"], asked)


def check_version(name: str, version: str | None, asked: str | None) -> None:
    if asked is not None and version is not None and version != asked:
        raise UnknownModel(f"model {name!r} has no version {asked!r}; it serves version {version!r}")


# --- server ---------------------------------------------------------------------------


@router.get(declare("/v2", RoutePolicy("v2")).removeprefix("/v2"), response_model=schemas.ServerMetadata)
async def server_metadata() -> schemas.ServerMetadata:
    return SERVER


@router.get(declare("/v2/health/live", OPEN).removeprefix("/v2"), response_model=schemas.ServerLive)
async def server_live() -> schemas.ServerLive:
    return schemas.ServerLive(live=True)


@router.get(
    declare("/v2/health/ready", OPEN).removeprefix("/v2"),
    response_model=schemas.ServerReady,
    responses={503: {"model": schemas.ServerReady}},
)
async def server_ready(response: Response, dataplane: DataplaneDep, settings: SettingsDep) -> schemas.ServerReady:
    """Ready (200) once every model can serve, as ``/readyz``; else 503."""
    models = await dataplane.models.ready(settings.readiness_timeout_s)
    ready = all(model.ready for model in models.values())
    response.status_code = 200 if ready else 503
    return schemas.ServerReady(ready=ready)


# --- models: readiness and inference before metadata, whose version may hold slashes ------


MODEL = RoutePolicy("v2", (PATH_MODEL,))
"""A route about the model its path names."""


def model_route(method: str, suffix: str = "", policy: RoutePolicy = MODEL, **options):
    """Register a route at ``/models/{model_name}<suffix>`` and at the same path of one version of the model,
    which is admitted against the first's count."""

    def register(endpoint):
        path = router.prefix + "/models/{model_name}" + suffix
        versioned = router.prefix + "/models/{model_name}/versions/{model_version:path}" + suffix
        shared = dataclasses.replace(policy, ingress=None, proxy=None, shares=path) if policy.ingress else policy
        for template, declared in ((path, policy), (versioned, shared)):
            router.add_api_route(declare(template, declared).removeprefix(router.prefix), endpoint,
                                 methods=[method], **options)  # fmt: skip
        return endpoint

    return register


@model_route("GET", "/ready", OPEN, response_model=schemas.ModelReady, responses=ERRORS)
async def model_ready(
    model_name: str,
    response: Response,
    dataplane: DataplaneDep,
    settings: SettingsDep,
    model_version: str | None = None,
) -> schemas.ModelReady:
    tensor_model(model_name, dataplane)
    readiness = (await dataplane.models.ready(settings.readiness_timeout_s, [model_name]))[model_name]
    check_version(model_name, readiness.version, model_version)
    response.status_code = 200 if readiness.ready else 503
    return schemas.ModelReady(name=model_name, ready=readiness.ready)


INFER = {
    "response_model": schemas.InferenceResponse,
    "responses": {
        200: {
            "description": "The outputs: JSON, or (where an output was asked for as binary data) the JSON header "
            "of Inference-Header-Content-Length bytes followed by the outputs' binary data.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **ERRORS,
    },
    "openapi_extra": {"requestBody": {"content": {"application/json": {"schema": inline(schemas.InferenceRequest)}}}},
}


@model_route("POST", "/infer", RoutePolicy("v2", (PATH_MODEL,), ingress=24, proxy=48), **INFER)
async def infer(
    model_name: str,
    request: Request,
    dataplane: DataplaneDep,
    admission: AdmissionDep,
    model_version: str | None = None,
) -> Response:
    """Run the model on the request's input tensors: JSON, or JSON followed by binary tensor data."""
    model = tensor_model(model_name, dataplane)
    return await run(model, model_name, request, dataplane, admission, model_version)


EXPLAIN = {
    **INFER,
    "responses": {
        **INFER["responses"],
        504: {"model": schemas.ErrorResponse, "description": "The explanation took longer than its time budget."},
    },
}


@model_route("POST", "/explain", RoutePolicy("v2", (PATH_MODEL,), ingress=8, proxy=16), **EXPLAIN)
async def explain(
    model_name: str,
    request: Request,
    dataplane: DataplaneDep,
    admission: AdmissionDep,
    model_version: str | None = None,
) -> Response:
    """Explain the model's answer to the request's input tensors (the infer route's inputs; for `text`, with the
    zero-shot `labels`): `vision` gives a saliency grid per image, `text` each word's contribution to a label,
    `fusion` the exact decomposition of its scores."""
    tensor_model(model_name, dataplane)
    if model_name not in EXPLAINERS:
        raise UnknownModel(f"model {model_name!r} has no explainer; these do: {', '.join(EXPLAINERS)}")
    return await run(EXPLAINERS[model_name], model_name, request, dataplane, admission, model_version)


async def run(
    model: TensorModel,
    model_name: str,
    request: Request,
    dataplane: Dataplane,
    admission,
    model_version: str | None,
) -> Response:
    """Decode the request's tensors for ``model``, run it within the route's admission, encode its outputs."""
    deadline = request.state.deadline
    with admission.slot(request):
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedMediaType("compressed request bodies are not accepted; send Content-Encoding: identity")
        header, binary = split_body(await read_bytes(request), request.headers.get(HEADER_LENGTH))
        body = schemas.InferenceRequest.model_validate_json(header)
        inputs = decode_inputs(model, body.inputs, binary)
        outputs = requested_outputs(model, body, set(inputs))
        if model_version is not None:
            await require_version(model_name, dataplane, deadline, model_version)
        arrays, version = await model.infer(inputs, body.parameters, set(outputs), dataplane, deadline)
    check_version(model_name, version, model_version)
    return inference_response(model, arrays, outputs, body.id, version or model_version)


@model_route("GET", response_model=schemas.ModelMetadata, responses=ERRORS)
async def model_metadata(
    model_name: str, request: Request, dataplane: DataplaneDep, model_version: str | None = None
) -> schemas.ModelMetadata:
    model = tensor_model(model_name, dataplane)
    info = await call_models(lambda: dataplane.models[model_name].info.remote(), request.state.deadline)
    check_version(model_name, info["version"], model_version)
    shapes = model.shapes(info)
    rolled_out = model_name in dataplane.rollouts.configs
    rollouts = await dataplane.rollouts.summary(request.state.deadline) if rolled_out else {}
    return schemas.ModelMetadata(
        name=model_name,
        versions=[info["version"]],
        platform=model.platform,
        inputs=[schemas.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in model.inputs],
        outputs=[
            schemas.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(shapes[t.name])) for t in model.outputs
        ],
        parameters={
            "model": info["name"],
            "request_parameters": model.parameters,
            "tensors": {t.name: t.description for t in (*model.inputs, *model.outputs)},
            # a candidate beside this version: the rollout's application, mode, weight and the candidate's version
            **({"rollout": rollouts[model_name]} if model_name in rollouts else {}),
        },
    )


# --- tensors in and out ------------------------------------------------------------------


def decode_inputs(model: TensorModel, tensors: list[schemas.RequestInput], binary: bytes) -> dict[str, list[Element]]:
    """Each input's elements, checked against the model's declaration: name, datatype, shape, count, data."""
    declared = {tensor.name: tensor for tensor in model.inputs}
    decoded: dict[str, list[Element]] = {}
    offset = 0
    for tensor in tensors:
        spec = declared.get(tensor.name)
        if spec is None:
            raise BadTensor(f"model {model.name!r} has no input {tensor.name!r}; its inputs: {', '.join(declared)}")
        if tensor.name in decoded:
            raise BadTensor(f"input {tensor.name!r} is given more than once")
        if tensor.datatype != spec.datatype:
            given = tensor.datatype if tensor.datatype in DATATYPES else "a datatype the protocol does not define"
            raise BadTensor(f"input {tensor.name!r} has datatype {spec.datatype}, not {given}")
        most = getattr(limits(), spec.limit)
        if len(tensor.shape) != 1 or not 1 <= tensor.shape[0] <= most:
            raise BadTensor(f"input {tensor.name!r} has shape [N] with N from 1 to {most}; got {tensor.shape}")
        count = tensor.shape[0]
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if tensor.data is not None:
                raise BadTensor(f"input {tensor.name!r} has both data and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise BadTensor(f"input {tensor.name!r}: binary_data_size runs past the binary data of the request")
            raw = binary[offset : offset + size]
            if spec.datatype == "BYTES":
                decoded[tensor.name] = list(bytes_elements(raw, count, tensor.name))
            else:
                decoded[tensor.name] = numbers_from_binary(raw, count, spec.datatype, tensor.name)
            offset += size
            continue
        if tensor.data is None:
            raise BadTensor(f"input {tensor.name!r} has no data and no binary_data_size")
        elements = flatten(tensor.data, tensor.name)
        if len(elements) != count:
            raise BadTensor(f"input {tensor.name!r} has {len(elements)} elements; its shape says {count}")
        if spec.datatype != "BYTES":
            decoded[tensor.name] = numbers_from_json(elements, spec.datatype, tensor.name)
            continue
        if not all(isinstance(element, str) for element in elements):
            raise BadTensor(f"input {tensor.name!r}: BYTES data in JSON are strings")
        decoded[tensor.name] = elements
    if offset != len(binary):
        raise BadTensor("the request has more binary data than its inputs' binary_data_size")
    if missing := [t.name for t in model.inputs if t.required and t.name not in decoded]:
        raise BadTensor(f"model {model.name!r} needs input {missing[0]!r}")
    return decoded


def requested_outputs(model: TensorModel, body: schemas.InferenceRequest, inputs: set[str]) -> dict[str, bool]:
    """The outputs to return (name -> in binary), as asked for or the model's defaults."""
    binary_default = _flag(body.parameters, "binary_data_output", False)
    produced = model.produces(inputs)
    if body.outputs is None:
        return {t.name: binary_default for t in model.outputs if t.default and t.name in produced}
    declared = {t.name for t in model.outputs}
    outputs: dict[str, bool] = {}
    for output in body.outputs:
        if output.name not in declared:
            raise BadTensor(f"model {model.name!r} has no output {output.name!r}; its outputs: {', '.join(declared)}")
        if output.name not in produced:
            raise BadTensor(f"output {output.name!r} needs an input this request does not have")
        outputs[output.name] = _flag(output.parameters, "binary_data", binary_default)
    return outputs


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadTensor(f"parameter {name!r} is true or false")
    return value


def inference_response(
    model: TensorModel, arrays: dict, outputs: dict[str, bool], request_id: str | None, version: str | None
) -> Response:
    datatypes = {t.name: t.datatype for t in model.outputs}
    header_outputs, blobs = [], []
    for name, binary in outputs.items():
        array = arrays[name]
        data, blob = output_data(array, datatypes[name], binary)
        entry: dict[str, Any] = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
        if blob is not None:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = data
        header_outputs.append(entry)
    header: dict[str, Any] = {"model_name": model.name, "outputs": header_outputs}
    if version is not None:
        header["model_version"] = version
    if request_id is not None:
        header["id"] = request_id
    body, header_length = join_body(header, blobs)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )
