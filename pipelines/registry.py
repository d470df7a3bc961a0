"""The models of an application by name: what the dataplane calls and what every protocol lists.

The app builder (``pipelines.multimodal``) binds each model deployment and hands the ingress one mapping of
name to ``DeploymentHandle``. Protocols list, describe and probe models through this registry, so adding a
model to the graph adds an entry here and touches no route.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ReplicaState

from deployments.downstream import Deadline, call_models
from deployments.errors import MaasError

logger = logging.getLogger("ray.serve")

CONTROLLER_TIMEOUT_S = 5.0
"""How long a readiness probe waits for the Serve controller when a model did not answer it in time."""

_serve_status_lock = threading.Lock()


class UnknownModel(MaasError):
    """The request names a model this application does not serve."""

    status_code = 404
    error_type = "model_not_found"


@dataclass
class ModelReadiness:
    ready: bool
    model: str | None = None  # the name the deployment reports
    version: str | None = None
    message: str | None = None


class ModelRegistry(Mapping[str, DeploymentHandle]):
    """Model name -> deployment handle, in the order the app builder gave them."""

    def __init__(self, handles: Mapping[str, DeploymentHandle]):
        self._handles = dict(handles)

    def __getitem__(self, name: str) -> DeploymentHandle:
        try:
            return self._handles[name]
        except KeyError:
            raise UnknownModel(f"no model named {name!r}; models: {', '.join(self._handles)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    async def infos(self, deadline: Deadline) -> list[dict]:
        """What each model's answering replica reports (``info()``), with its registry name as ``deployment``."""

        async def infos() -> list[dict]:
            calls = {name: handle.info.remote() for name, handle in self._handles.items()}
            return [{"deployment": name, **await call} for name, call in calls.items()]

        return await call_models(infos, deadline)

    async def ready(self, timeout_s: float, names: list[str] | None = None) -> dict[str, ModelReadiness]:
        """Readiness of each model (all, or ``names``): ready once a replica with its model loaded answers.

        Each model is asked directly, for up to ``timeout_s``. One that does not answer in time is asked about
        at the Serve controller (up to ``CONTROLLER_TIMEOUT_S`` more): under load its replicas' queues are full,
        and a model that is busy serving is ready.
        """
        names = list(self._handles) if names is None else names
        calls = {name: self[name].ready.remote() for name in names}
        deadline = time.monotonic() + timeout_s
        answers: dict[str, ModelReadiness] = {}
        silent = []
        for name, call in calls.items():
            try:
                answer = await asyncio.wait_for(call, timeout=max(0.0, deadline - time.monotonic()))
                answers[name] = ModelReadiness(ready=True, **answer)
            except TimeoutError:
                silent.append(name)
            except Exception as exc:  # noqa: BLE001 - any failure means not ready; the type says which
                answers[name] = ModelReadiness(ready=False, message=type(exc).__name__)
        if silent:
            running = await running_replicas([self[name] for name in silent])
            for name in silent:
                replicas = running.get(self[name].deployment_name, 0)
                message = f"no replica answered within {timeout_s} s"
                if replicas:
                    message = f"busy: {message}; {replicas} replicas running"
                answers[name] = ModelReadiness(ready=replicas > 0, message=message)
        return {name: answers[name] for name in names}


def serve_status():
    """``serve.status()``, one call at a time: it is not thread-safe in Ray 2.60, and a call that timed out may
    still be running."""
    with _serve_status_lock:
        return serve.status()


async def running_replicas(handles: list[DeploymentHandle], timeout_s: float = CONTROLLER_TIMEOUT_S) -> dict[str, int]:
    """Replicas in state RUNNING (started, model loaded, health checks passing) per deployment of ``handles``,
    from the Serve controller; ``{}`` if it does not answer within ``timeout_s``."""

    try:
        applications = (await asyncio.wait_for(asyncio.to_thread(serve_status), timeout=timeout_s)).applications
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
