"""Candidate applications: one model's deployment on its own (``vision``, ``text``, ``llm``, ``ocr``, ``asr``,
``tts``), for a rollout beside the stable variant.

A candidate is a Serve application of its own in the same YAML, so adding, changing or removing it never
touches the main application (whose ``args`` or code changing would replace every replica). It has no HTTP
route (``route_prefix: null``): the main application's ingress sends it the share of traffic its rollout
gives it (``pipelines.rollouts``). Its deployment takes the same settings as the stable one: a ``user_config``
with its model, batching and drift, its own replicas and resources::

    - name: vision-candidate
      route_prefix: null
      import_path: pipelines.candidates:vision
      deployments:
        - name: VisionClassifier
          num_replicas: 1
          user_config:
            model: {version: "2"}
"""

import copy

from ray.serve import Application

from deployments.language import TextGenerator
from deployments.ocr import TextReader
from deployments.recognizer import SpeechRecognizer
from deployments.synthesizer import SpeechSynthesizer
from deployments.text import TextEncoder
from deployments.vision import VisionClassifier
from pipelines.rollouts import VARIANT_MODELS


def vision(args: dict | None = None) -> Application:
    """A candidate image classifier (``rollouts.vision`` in the ingress's ``user_config``)."""
    return VisionClassifier.bind()


def text(args: dict | None = None) -> Application:
    """A candidate sentence encoder (``rollouts.text``): embeddings, relevance scores and zero-shot labels."""
    return TextEncoder.bind()


def llm(args: dict | None = None) -> Application:
    """A candidate language model (``rollouts.llm``): chat and completions, streamed."""
    return TextGenerator.bind()


def ocr(args: dict | None = None) -> Application:
    """A candidate text reader (``rollouts.ocr``): the lines of text in images."""
    return TextReader.bind()


def asr(args: dict | None = None) -> Application:
    """A candidate speech recogniser (``rollouts.asr``): transcriptions, streamed."""
    return SpeechRecognizer.bind()


def tts(args: dict | None = None) -> Application:
    """A candidate speech synthesiser (``rollouts.tts``; canary only): speech, streamed."""
    return SpeechSynthesizer.bind()


def with_candidate(config: dict, model: str, rollout: dict, name: str | None = None, **settings) -> dict:
    """A copy of a Serve config (``serve_config.yaml``'s shape) with a candidate for ``model`` beside the main
    application, and the ingress's ``rollouts.<model>`` set to ``rollout`` (its ``candidate`` filled in).

    The candidate's deployment is the stable one's: one replica with its resources and ``user_config``, whose
    ``model`` settings ``settings`` update (``version`` names it; default ``candidate``)."""
    config = copy.deepcopy(config)
    main = next(app for app in config["applications"] if app["import_path"] == "pipelines.multimodal:build_app")
    deployment = VARIANT_MODELS[model]
    stable = next(d for d in main["deployments"] if d["name"] == deployment)
    ingress = next(d for d in main["deployments"] if d["name"] == "Ingress")
    name = name or f"{model}-candidate"
    ingress["user_config"].setdefault("rollouts", {})[model] = {**rollout, "candidate": name}
    user_config = copy.deepcopy(stable.get("user_config", {}))
    user_config["model"] = {**user_config.get("model", {}), "version": "candidate", **settings}
    config["applications"].append({
        "name": name,
        "route_prefix": None,
        "import_path": f"pipelines.candidates:{model}",
        "deployments": [{
            "name": deployment,
            "num_replicas": 1,
            **{key: stable[key] for key in ("max_ongoing_requests", "ray_actor_options") if key in stable},
            "user_config": user_config,
        }],
    })  # fmt: skip
    return config
