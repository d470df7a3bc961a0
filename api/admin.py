"""The operator's routes: the model rollouts, what the judge decided and why, and pause, resume, promote or
abort (``pipelines.rollouts``, ``deployments.judge``). With API keys on, only keys with the ``admin`` scope
(or ``*``) may call them."""

from http import HTTPStatus
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from api.context import DataplaneDep
from api.policy import RoutePolicy, declare
from api.v1.bodies import JSON, read_body
from api.v1.routes import responses
from api.v1.schemas import ErrorResponse
from deployments.errors import MaasError
from pipelines.rollouts import VARIANT_MODELS

router = APIRouter()
ADMIN = RoutePolicy("admin")


class NoRollout(MaasError):
    status_code = HTTPStatus.NOT_FOUND
    error_type = "rollout_not_found"


class NotAllowed(MaasError):
    status_code = HTTPStatus.CONFLICT
    error_type = "rollout_conflict"


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal[tuple(VARIANT_MODELS)] = Field(description="The model whose rollout to act on.")
    action: Literal["pause", "resume", "promote", "abort"] = Field(
        description="pause: hold the candidate's weight and stop judging; resume; promote: the policy's next step "
        "now; abort: the candidate's weight to 0% at once."
    )


class Rollouts(BaseModel):
    rollouts: dict[str, dict] = Field(
        description="Per model: candidate, mode, status, weight, the step's window and checks, per-variant totals "
        "and the decisions with their reasons."
    )
    update_error: str | None = Field(None, description="Why the last change of the ingress's rollouts was refused.")


@router.get(declare("/v1/admin/rollouts", ADMIN), response_model=Rollouts, responses=responses(503))
async def rollouts(dataplane: DataplaneDep) -> Rollouts:
    """Every model rollout: where it stands, what the judge measured and decided, and why."""
    configured = dataplane.rollouts.configs
    described = await dataplane.rollouts.call_judge("describe") if configured else {}
    return Rollouts(rollouts={model: described[model] for model in configured if model in described},
                    update_error=dataplane.rollouts.update_error)  # fmt: skip


@router.post(
    "/v1/admin/rollouts",
    responses={
        **responses(413, 415, 422, 503),
        404: {"model": ErrorResponse, "description": "The model has no rollout."},
        409: {"model": ErrorResponse, "description": "The rollout's state does not allow the action."},
    },
    openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": RolloutAction.model_json_schema()}}}},
)
async def act(request: Request, dataplane: DataplaneDep) -> dict:
    """An operator's decision on a rollout, logged and counted as the judge's are; returns the decision."""
    body, _ = await read_body(request, RolloutAction)
    key = request.scope.get("state", {}).get("api_key")
    who = f"key {key.id}" if key is not None else "operator"
    answer = await dataplane.rollouts.call_judge("act", body.model, body.action, who)
    if answer.get("refused") == "not_found":
        raise NoRollout(answer["message"])
    if answer.get("refused") == "conflict":
        raise NotAllowed(answer["message"])
    return answer["decision"]
