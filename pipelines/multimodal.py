"""The multimodal application: ingress -> (vision || text) -> fusion; OCR, the language model and the explainer
beside them.

``build_app`` binds the model deployments and hands the ingress a registry of them by name; the request
graph over them is ``pipelines.dataplane``.

The Serve YAML points at ``build_app`` with ``import_path:
pipelines.multimodal:build_app``; its ``args`` section is validated as
``MultimodalArgs`` when the app is built, so a typo fails the deploy with a
message naming the field, before any replica starts.

``args`` holds only what concerns the whole application: Serve hashes it into
the code version of every deployment, so changing it replaces every replica.
Each deployment's own settings (which model it serves, batching, drift,
fusion weights, the ingress's limits) are in its ``user_config`` in the YAML's
``deployments`` section, with its resources and autoscaling: a change there
reaches only that deployment, in place.
"""

import logging
import time

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve import Application

from deployments.errors import ConfigError
from deployments.explainer import Explainer
from deployments.fusion import FusionScorer
from deployments.ingress import Ingress
from deployments.judge import RolloutJudge
from deployments.language import TextGenerator
from deployments.ocr import TextReader
from deployments.recognizer import SpeechRecognizer
from deployments.synthesizer import SpeechSynthesizer
from deployments.text import TextEncoder
from deployments.vision import VisionClassifier
from pipelines.registry import ModelRegistry

logger = logging.getLogger("ray.serve")


class MultimodalArgs(BaseModel):
    """Builder arguments (the ``args`` section of the Serve YAML)."""

    model_config = ConfigDict(extra="forbid")

    require_gpus: bool = Field(
        False,
        description="Fail the deploy unless the cluster has GPUs. Set by the GPU profile, whose "
        "replicas would otherwise wait forever for a GPU that does not exist.",
    )
    gpu_wait_s: float = Field(
        0.0,
        ge=0.0,
        le=3600.0,
        description="With require_gpus: how long to wait for a GPU node to join before failing (on clusters "
        "whose GPU workers start after the head, such as the cluster launcher's or KubeRay's).",
    )

    @model_validator(mode="before")
    @classmethod
    def _models_moved(cls, args: dict) -> dict:
        for key, deployment in (("vision", "VisionClassifier"), ("text", "TextEncoder")):
            if isinstance(args, dict) and key in args:
                raise ValueError(
                    f"args.{key} moved: set it as `model:` in the user_config of the {deployment} deployment, "
                    "where a change updates only that deployment"
                )
        return args


def build_app(args: MultimodalArgs | dict | None = None) -> Application:
    """Bind the vision, text, fusion, OCR, language-model, explainer, speech and ingress deployments into one
    application."""
    try:
        args = MultimodalArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid application args:\n{exc}") from None
    if args.require_gpus:
        _check_gpus(args.gpu_wait_s)

    vision = VisionClassifier.bind()
    text = TextEncoder.bind()
    fusion = FusionScorer.bind(vision, text)
    # The other models load once fusion serves (so vision and text do): on a small node the multimodal
    # route's models get the CPU first at a cold start (benchmarks/NOTES.md, "The cold start").
    ocr = TextReader.bind(start_after=fusion)
    llm = TextGenerator.bind(start_after=fusion)
    explainer = Explainer.bind(text, start_after=fusion)
    asr = SpeechRecognizer.bind(start_after=fusion)
    tts = SpeechSynthesizer.bind(start_after=fusion)
    # The models by the names every protocol knows them by (GET /v1/models, /v2/models/{name}, OpenAI's model).
    models = {"vision": vision, "text": text, "fusion": fusion, "ocr": ocr, "llm": llm, "explainer": explainer,
              "asr": asr, "tts": tts}  # fmt: skip
    # Every ingress replica reports its rollouts' counts to one judge and routes by its decisions.
    return Ingress.bind(models, RolloutJudge.bind())


MODEL_DEPLOYMENTS = {
    "vision": VisionClassifier.name,
    "text": TextEncoder.name,
    "fusion": FusionScorer.name,
    "ocr": TextReader.name,
    "llm": TextGenerator.name,
    "explainer": Explainer.name,
    "asr": SpeechRecognizer.name,
    "tts": SpeechSynthesizer.name,
}


def running_models(app_name: str) -> ModelRegistry:
    """The registry of a running application's models, for a driver such as a batch job."""
    from ray import serve

    return ModelRegistry(
        {
            name: serve.get_deployment_handle(deployment, app_name=app_name)
            for name, deployment in MODEL_DEPLOYMENTS.items()
        }
    )


def _check_gpus(wait_s: float) -> None:
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + wait_s
    while (gpus := ray.cluster_resources().get("GPU", 0)) <= 0 and time.monotonic() < deadline:
        logger.info("No GPU in the cluster yet; waiting up to %.0f s more for a GPU node.", deadline - time.monotonic())
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
    if gpus <= 0:
        waited = f" (waited {wait_s:.0f} s for a GPU node to join)" if wait_s else ""
        raise ConfigError(
            f"this config asks for GPUs (require_gpus: true) but the Ray cluster has none{waited}, so its "
            "replicas would never start. Deploy serve_config.yaml (the CPU profile) instead, or add "
            "GPU nodes."
        )
    logger.info("Cluster has %s GPUs; GPU replicas will be scheduled on them.", gpus)
