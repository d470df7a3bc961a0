"""The Open Inference Protocol's JSON bodies as pydantic models (REST side).

Field names and shapes follow the spec (KServe ``predict-api/v2``); ``parameters`` are free-form objects, as
the spec allows, and each model reads the ones it knows.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.v2.tensors import DATATYPES

Parameters = dict[str, Any]
Shape = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class RequestInput(_Body):
    name: str = Field(min_length=1, max_length=64)
    shape: list[int] = Field(min_length=1, max_length=8)
    datatype: str = Field(json_schema_extra={"enum": list(DATATYPES)})
    parameters: Parameters = Field(default_factory=dict)
    data: Any = Field(None, description="Row-major tensor data, flat or nested; absent with binary_data_size.")


class RequestOutput(_Body):
    name: str = Field(min_length=1, max_length=64)
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(_Body):
    id: str | None = Field(None, max_length=256)
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1, max_length=8)
    outputs: list[RequestOutput] | None = Field(None, max_length=8)


class ResponseOutput(_Body):
    name: str
    shape: Shape
    datatype: str
    parameters: Parameters | None = None
    data: list | None = None


class InferenceResponse(_Body):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Body):
    name: str
    datatype: str
    shape: Shape = Field(description="-1 for a dimension of variable size (the batch dimension first).")


class ModelMetadata(_Body):
    name: str
    versions: list[str] = Field(description="The version the model's replicas serve now.")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = Field(
        None,
        description="The model served (model), the request parameters it takes, what each tensor holds, and, when "
        "the model has a candidate, its rollout (candidate, mode, weight, ready, version).",
    )


class ServerMetadata(_Body):
    name: str
    version: str
    extensions: list[str]


class ServerLive(_Body):
    live: bool


class ServerReady(_Body):
    ready: bool


class ModelReady(_Body):
    name: str
    ready: bool


class ErrorResponse(_Body):
    error: str
