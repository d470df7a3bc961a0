"""Liveness and readiness of the service as a whole (``/healthz``, ``/readyz``), for load balancers and Kubernetes."""

from fastapi import APIRouter, Response

from api.context import DataplaneDep, SettingsDep
from api.policy import OPEN, declare
from api.v1 import schemas

router = APIRouter()


@router.get(declare("/healthz", OPEN), response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """Liveness: the ingress answers. It says nothing about the models; see /readyz."""
    return schemas.Health(status="ok")


@router.get(
    declare("/readyz", OPEN),
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "Some model cannot serve yet."}},
)
async def readyz(response: Response, dataplane: DataplaneDep, settings: SettingsDep) -> schemas.Readiness:
    """Readiness: 200 once every model deployment has a replica with its model loaded, else 503.

    A model that does not answer within the ingress's ``readiness_timeout_s`` but has replicas running is
    ready and busy (under load its replicas' queues are full).
    """
    models = await dataplane.models.ready(settings.readiness_timeout_s)
    deployments = {name: schemas.DeploymentReadiness(**vars(model)) for name, model in models.items()}
    ready = all(d.ready for d in deployments.values())
    response.status_code = 200 if ready else 503
    return schemas.Readiness(status="ready" if ready else "not_ready", deployments=deployments)
