"""The multimodal application: ingress -> (vision || text) -> fusion.

The Serve YAML points at ``build_app`` with ``import_path:
pipelines.multimodal:build_app``; its ``args`` section is validated as
``MultimodalArgs`` when the app is built, so a typo fails the deploy with a
message naming the field, before any replica starts. Replica resources,
autoscaling and batching live in the YAML's ``deployments`` section.
"""

import logging

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve import Application

from deployments.errors import ConfigError
from deployments.fusion import FusionScorer
from deployments.ingress import Ingress
from deployments.text import TextConfig, TextEncoder
from deployments.vision import VisionClassifier, VisionConfig

logger = logging.getLogger("ray.serve")


class MultimodalArgs(BaseModel):
    """Builder arguments (the ``args`` section of the Serve YAML)."""

    model_config = ConfigDict(extra="forbid")

    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    require_gpus: bool = Field(
        False,
        description="Fail the deploy unless the cluster has GPUs. Set by the GPU profile, whose "
        "replicas would otherwise wait forever for a GPU that does not exist.",
    )


def build_app(args: MultimodalArgs | dict | None = None) -> Application:
    """Bind the vision, text, fusion and ingress deployments into one application."""
    try:
        args = MultimodalArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid application args:\n{exc}") from None
    if args.require_gpus:
        _check_gpus()

    vision = VisionClassifier.bind(args.vision)
    text = TextEncoder.bind(args.text)
    fusion = FusionScorer.bind(vision, text)
    return Ingress.bind(vision, text, fusion)


def _check_gpus() -> None:
    if not ray.is_initialized():
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus <= 0:
        raise ConfigError(
            "this config asks for GPUs (require_gpus: true) but the Ray cluster has none, so its "
            "replicas would never start. Deploy serve_config.yaml (the CPU profile) instead, or add "
            "GPU nodes."
        )
    logger.info("Cluster has %s GPUs; GPU replicas will be scheduled on them.", gpus)
