"""Where a replica runs its model (device choice, thread count, packaged weights), and the base of the model
deployments: live settings, error counting, readiness and ``GET /v1/models`` info."""

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from deployments.contracts import MAX_GROUP_SIZE
from deployments.errors import InvalidInput
from monitoring.drift import DriftConfig, DriftMonitor
from monitoring.metrics import ModelMetrics

if TYPE_CHECKING:
    import torch
    from ray.serve.handle import DeploymentHandle

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
    """Set the model's intra-op threads (torch's, and what ONNX Runtime sessions are given) so replicas on one
    node don't oversubscribe it.

    ``None`` means one thread per CPU Ray reserved for this process (at least
    one, so a fractional reservation gets a single thread); outside Ray,
    torch's own default. torch is not imported for this: where it is not loaded yet, ``OMP_NUM_THREADS`` is
    set, which torch takes as its thread count when the model's load imports it, so a replica whose model
    runs without torch (fusion, OCR, a vision model from its compiled ONNX graph) starts without it.
    """
    if torch_threads is None:
        cpus = assigned_cpus()
        if not cpus:
            import torch

            return torch.get_num_threads()
        torch_threads = max(1, math.floor(cpus))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(torch_threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
    return torch_threads


def replica_gpu_ids() -> list:
    """The GPUs Ray assigned to this process (a replica); none outside a Ray actor. No torch needed."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    return []


def device_type() -> str:
    """``cuda`` or ``cpu``, as ``pick_device`` decides; torch is imported only where Ray assigned a GPU (or
    outside a Ray actor), so a CPU replica can choose its runtime before anything loads torch."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None and not ray.get_gpu_ids():
            return "cpu"
    except Exception:  # noqa: BLE001 - outside Ray: decide from torch
        pass
    return pick_device().type


def pick_device() -> "torch.device":
    """CUDA when this replica was given a GPU and torch can see one; else the CPU.

    Inside a Ray actor (a Serve replica) the GPU must have been assigned by Ray,
    so a replica with ``num_gpus: 0`` stays on the CPU even on a GPU node.
    Outside an actor (a batch job's driver, a test) any visible GPU is used.
    """
    import torch

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


CACHE_ENV = "MAAS_MODEL_CACHE"
DEFAULT_CACHE = "~/.cache/maas-cluster"


def model_cache(kind: str, cache_dir: str | None = None) -> Path:
    """Where models prepared once from their packages (converted, joined) are kept: ``cache_dir``, else
    ``$MAAS_MODEL_CACHE``, else ``~/.cache/maas-cluster``; one folder per kind of model."""
    return Path(cache_dir or os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser() / kind


def file_digest(path: Path, length: int = 12) -> str:
    """Short sha256 of a file: identifies exactly which weights a replica runs."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class BatchingConfig(BaseModel):
    """Live batching knobs of a model deployment, set through the Serve YAML's ``user_config``.

    Every model deployment's settings extend it. Its ``@serve.batch`` methods
    take their arguments from ``batch_defaults()`` of that settings class, so
    the code's default and the settings' default are one value; ``reconfigure``
    then applies the live ones (the YAML's) before the first request.

    Keep ``max_batch_size`` at or below the deployment's ``max_ongoing_requests``
    (requests for the vision model, texts for the text model): a replica never
    holds more than that many requests, so a larger batch can never fill.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=1.0)

    @classmethod
    def batch_defaults(cls) -> dict:
        """``@serve.batch`` arguments: this settings class's batching defaults."""
        return {name: cls.model_fields[name].default for name in BatchingConfig.model_fields}

    def batching(self) -> dict:
        """The batching knobs alone, as ``GET /v1/models`` reports them."""
        return {name: getattr(self, name) for name in BatchingConfig.model_fields}

    def apply(self, batch_method) -> None:
        """Apply to a ``@serve.batch`` method of a live replica."""
        batch_method.set_max_batch_size(self.max_batch_size)
        batch_method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)


class ModelSettings(BatchingConfig):
    """A loaded model's ``user_config``: batching knobs and drift detection, both live-tunable.

    Each ``LiveModelDeployment`` extends it with ``model``, the model it serves.
    """

    drift: DriftConfig = Field(default_factory=DriftConfig)


class ModelDeployment:
    """What every model deployment has: live settings, metrics, readiness and ``GET /v1/models`` info.

    ``reconfigure`` validates ``user_config`` into ``settings_type``, lets the
    subclass ``prepare`` for it (load a model, say) while the current settings
    keep serving, applies the batching knobs to ``batch_methods()``, and then
    ``commit``s: the subclass starts serving what it prepared.

    A replica whose new settings fail to validate or prepare keeps serving the
    current ones and reports why (``update_error`` in ``GET /v1/models``, the
    ``maas_model_update_failures_total`` metric, the replica log): raising there
    would make Serve stop a healthy replica. Only a replica that has no settings
    yet fails, which fails its start and shows in ``serve status``.

    Calls that raise are counted in ``maas_model_errors_total`` by exception
    type: each public inference method runs its body in ``with self.counted():``.

    ``start_after``, a handle to another deployment, orders a start: a replica
    with nothing to serve yet prepares its first settings only once that
    deployment serves (``start_after_ready``). The application passes the models
    its main route needs, so on a small node they get the CPU first.
    """

    settings_type: ClassVar[type[BatchingConfig]]
    task: ClassVar[str]
    group_methods: ClassVar[frozenset[str]] = frozenset()  # the methods ``call_group`` may call

    def __init__(self, start_after: "DeploymentHandle | None" = None):
        self.settings: BatchingConfig | None = None
        self.start_after = start_after
        self.started_at = int(time.time())
        self.update_error: str | None = None
        # Labelled with the model and version served by each ``commit``, before anything is recorded.
        self.metrics = ModelMetrics(model="", version="")

    async def prepare(self, settings: BatchingConfig) -> Any:
        """Get ready to serve ``settings`` while the current ones serve; raise to refuse them."""

    def commit(self, prepared: Any) -> None:
        """Serve ``self.settings`` (just set) and what ``prepare`` returned; label the metrics. Must not raise."""
        raise NotImplementedError

    def batch_methods(self) -> list:
        """The ``@serve.batch`` methods the batching settings apply to."""
        return []

    async def call_group(self, method: str, calls: list[tuple]) -> list:
        """Several requests' calls of ``method`` (one of ``group_methods``) in one handle call: an ingress
        groups them (``pipelines/grouping.py``). Each call joins this replica's batching as its own handle call
        would, and gets its own result, or its own error in its place."""
        if method not in self.group_methods:
            raise InvalidInput(f"{method!r} cannot be called in a group; these can: {sorted(self.group_methods)}")
        if len(calls) > MAX_GROUP_SIZE:
            raise InvalidInput(f"a group holds at most {MAX_GROUP_SIZE} calls, got {len(calls)}")
        function = getattr(self, method)
        return list(await asyncio.gather(*(function(*args) for args in calls), return_exceptions=True))

    def served(self) -> tuple[str, str]:
        """Name and version of what this replica serves now."""
        raise NotImplementedError

    def describe(self) -> dict:
        """This deployment's own ``GET /v1/models`` fields: ``source``, ``device``, ``torch_threads``,
        ``details`` and ``drift`` (``replica_info``'s arguments)."""
        raise NotImplementedError

    async def reconfigure(self, user_config: dict) -> None:
        if self.settings is None and self.start_after is not None:
            await start_after_ready(self.start_after)
        try:
            settings = self.settings_type.model_validate(user_config or {})
            prepared = await self.prepare(settings)
        except Exception as exc:
            if self.settings is None:
                raise  # nothing to keep serving: fail this replica's start
            self.update_error = f"{type(exc).__name__}: {exc}"[:2000]
            self.metrics.observe_update_failure(exc)
            logger.error("Kept serving %s %s; the new settings failed: %s", *self.served(), exc)
            return
        for method in self.batch_methods():
            settings.apply(method)
        self.settings, self.update_error = settings, None
        self.commit(prepared)

    async def ready(self) -> dict:
        """Name and version of what this replica serves (it answers only once it serves something)."""
        name, version = self.served()
        return {"model": name, "version": version}

    async def info(self) -> dict:
        """``GET /v1/models`` fields of this replica."""
        name, version = self.served()
        fields = self.describe()
        fields["details"] = {**fields["details"], "update_error": self.update_error}
        return replica_info(name=name, task=self.task, version=version, created=self.started_at, **fields)

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count an exception raised in the block (``maas_model_errors_total``, by type), and let it go on."""
        try:
            yield
        except Exception as exc:
            self.metrics.observe_error(exc)
            raise


class LiveModelDeployment(ModelDeployment):
    """A model deployment whose model is configuration, replaced in place.

    The model a deployment serves is the ``model`` section of its own
    ``user_config``, not an argument of the application: Serve hashes an
    application's ``args`` into the code version of every deployment, so a
    change there restarts all of them, while a ``user_config`` change reaches
    only its own deployment's replicas, through ``reconfigure``. There the
    replica loads the new model in a worker thread while the current one keeps
    serving, then swaps them; each batch uses the model it started with. A
    model that fails to load is refused like any bad update (``ModelDeployment``).
    """

    settings_type: ClassVar[type[ModelSettings]]

    def __init__(self, start_after: "DeploymentHandle | None" = None):
        super().__init__(start_after)
        self.model: Any = None
        self.torch_threads = 0
        self.drift: DriftMonitor | None = None

    def load_model(self, config: BaseModel) -> Any:
        """Load the model ``config`` describes (runs in a worker thread)."""
        raise NotImplementedError

    def model_swapped(self, model: Any) -> None:
        """Reset state tied to the previous model (caches); called after each swap."""

    def model_details(self) -> dict:
        """Facts about the model for ``details`` in ``GET /v1/models`` (classes, dimensions, ...)."""
        return {}

    async def prepare(self, settings: ModelSettings) -> Any:
        """The model to serve: the current one if ``settings.model`` did not change, else the new one, loaded."""
        if self.model is not None and settings.model == self.model.config:
            return self.model
        return await asyncio.to_thread(self._load, settings.model)

    def _load(self, config: BaseModel) -> Any:
        self.torch_threads = configure_threads(config.torch_threads)
        return self.load_model(config)

    def commit(self, model: Any) -> None:
        settings = self.settings
        if model is self.model:
            self.drift = self.drift.with_config(settings.drift)
        else:
            previous, self.model = self.model, model
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
        self.metrics.set_drift(self.drift)

    def served(self) -> tuple[str, str]:
        return self.model.name, self.model.version

    def describe(self) -> dict:
        model = self.model
        return {
            "source": model.config.source,
            "device": str(model.device),
            "torch_threads": self.torch_threads,
            "details": {**self.model_details(), "batching": self.settings.batching()},
            "drift": self.drift.status().model_dump(),
        }


async def start_after_ready(handle: "DeploymentHandle", timeout_s: float | None = None) -> None:
    """Wait until ``handle``'s deployment has a replica that serves (its ``ready`` answers), at most ``timeout_s``
    (``START_AFTER_TIMEOUT_S``): a deployment that never starts delays the start, it does not stop it.

    At a cluster's start every replica starts at once; on two cores the models the main route needs would
    share them with models it does not need. When the replica of a running deployment is replaced or added,
    the deployment already serves and this returns at once.
    """
    timeout_s = START_AFTER_TIMEOUT_S if timeout_s is None else timeout_s
    began = time.monotonic()
    try:
        await asyncio.wait_for(handle.ready.remote(), timeout_s)
    except TimeoutError:
        logger.warning(
            "%s did not serve within %g s; starting without waiting longer", handle.deployment_name, timeout_s
        )
        return
    except Exception as exc:  # a failed replica of it: this one starts anyway
        logger.warning("starting without waiting for %s: %s: %s", handle.deployment_name, type(exc).__name__, exc)
        return
    waited = time.monotonic() - began
    if waited >= 1:
        logger.info("Started after %s began serving (waited %.1f s)", handle.deployment_name, waited)


# The longest a replica waits for its ``start_after`` deployment before it starts anyway.
START_AFTER_TIMEOUT_S = 90.0


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
    created: int | None = None,
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
        "created": created if created is not None else int(time.time()),
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
