"""The shipped Serve configs are valid before anything is deployed."""

import math
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.errors import ConfigError
from deployments.explainer import ExplainerSettings
from deployments.fusion import FusionConfig
from deployments.ingress import IngressConfig
from deployments.language import GenerationSettings
from deployments.ocr import OcrSettings
from deployments.recognizer import RecognizerSettings
from deployments.synthesizer import SynthesizerSettings
from deployments.text import TextSettings
from deployments.vision import VisionSettings
from pipelines.multimodal import MultimodalArgs, build_app

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {"cpu": ROOT / "serve_config.yaml", "gpu": ROOT / "serve_config.gpu.yaml"}
MODEL_CONFIGS = {
    "VisionClassifier": VisionSettings,
    "TextEncoder": TextSettings,
    "FusionScorer": FusionConfig,
    "TextReader": OcrSettings,
}
USER_CONFIGS = {
    **MODEL_CONFIGS,
    "TextGenerator": GenerationSettings,
    "Explainer": ExplainerSettings,
    "SpeechRecognizer": RecognizerSettings,
    "SpeechSynthesizer": SynthesizerSettings,
    "Ingress": IngressConfig,
}


def load(profile: str) -> dict:
    return yaml.safe_load(PROFILES[profile].read_text())


def deployments(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_config_is_a_valid_serve_deploy_config(profile):
    ServeDeploySchema.model_validate(load(profile))


@pytest.mark.parametrize("profile", PROFILES)
def test_args_and_user_configs_validate(profile):
    config = load(profile)
    MultimodalArgs.model_validate(config["applications"][0]["args"])
    for name, deployment in deployments(config).items():
        if name in USER_CONFIGS:
            USER_CONFIGS[name].model_validate(deployment["user_config"])


@pytest.mark.parametrize("profile", PROFILES)
def test_batches_can_fill(profile):
    """Serve caps what a replica holds at max_ongoing_requests; a larger batch never forms."""
    for name, deployment in deployments(load(profile)).items():
        if name in MODEL_CONFIGS:
            assert deployment["user_config"]["max_batch_size"] <= deployment["max_ongoing_requests"], name


@pytest.mark.parametrize("profile", PROFILES)
def test_every_deployment_has_its_user_config_validated_here(profile):
    assert set(deployments(load(profile))) == set(USER_CONFIGS)


@pytest.mark.parametrize("profile", PROFILES)
def test_a_language_model_replica_holds_only_what_it_decodes(profile):
    """More would wait inside one replica for its slots, not in Serve's queue for the first free one."""
    generator = deployments(load(profile))["TextGenerator"]
    assert generator["user_config"]["max_sequences"] == generator["max_ongoing_requests"]


@pytest.mark.parametrize("profile", PROFILES)
def test_generation_timeout_matches_the_proxys(profile):
    from deployments.proxy import ProxySettings

    ingress = deployments(load(profile))["Ingress"]["user_config"]
    assert ingress["generation_timeout_s"] == ProxySettings().generation_timeout_s


@pytest.mark.parametrize("profile", PROFILES)
def test_every_model_deployment_autoscales(profile):
    for name in MODEL_CONFIGS:
        autoscaling = deployments(load(profile))[name]["autoscaling_config"]
        assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]


def test_cpu_profile_asks_for_no_gpu():
    for deployment in deployments(load("cpu")).values():
        assert deployment["ray_actor_options"].get("num_gpus", 0) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_the_explainer_explains_the_served_vision_model(profile):
    served = deployments(load(profile))
    assert served["Explainer"]["user_config"]["model"] == served["VisionClassifier"]["user_config"]["model"]


def test_gpu_profile_shares_gpus_fractionally_and_refuses_gpu_less_clusters():
    gpu = {n: d["ray_actor_options"].get("num_gpus", 0) for n, d in deployments(load("gpu")).items()}
    assert gpu["VisionClassifier"] == 0.25 and gpu["TextEncoder"] == 0.25
    assert load("gpu")["applications"][0]["args"]["require_gpus"] is True


def test_profiles_differ_only_in_gpu_shares():
    cpu, gpu = load("cpu"), load("gpu")
    for name, deployment in deployments(gpu).items():
        deployment["ray_actor_options"]["num_gpus"] = deployments(cpu)[name]["ray_actor_options"].get("num_gpus", 0)
        deployment["ray_actor_options"].pop("label_selector", None)  # keeps CPU work off GPU nodes
    gpu["applications"][0]["args"]["require_gpus"] = False
    del gpu["applications"][0]["args"]["gpu_wait_s"]
    assert cpu == gpu


def test_cpu_reservations_leave_room_for_every_deployment_to_surge_at_once():
    """A change of args or code replaces every deployment's replicas at once, each starting its surge replicas
    before it stops old ones: on a 2-core node all of them must fit, or the replacement waits on itself."""
    steady, surge = 0.0, 0.0
    for deployment in deployments(load("cpu")).values():
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        cpus = deployment["ray_actor_options"]["num_cpus"]
        steady += replicas * cpus
        surge += math.ceil(deployment["max_surge_percent"] * replicas / 100) * cpus
    assert steady + surge <= 1.8 + 1e-9  # and a margin for a replaced replica's process that is slow to exit


@pytest.mark.parametrize("profile", PROFILES)
def test_every_deployment_keeps_two_replicas_so_an_update_leaves_one_serving(profile):
    """Serve reconfigures one replica at a time and routes nothing to it meanwhile."""
    for name, deployment in deployments(load(profile)).items():
        replicas = deployment.get("autoscaling_config", {}).get("min_replicas", deployment.get("num_replicas"))
        assert replicas >= 2, name


@pytest.mark.parametrize("profile", PROFILES)
def test_no_deployment_stops_a_replica_before_its_replacement_runs(profile):
    for name, deployment in deployments(load(profile)).items():
        assert deployment.get("max_surge_percent", 0) > 0, name


@pytest.mark.parametrize("profile", PROFILES)
def test_ingress_deadline_and_drain_follow_the_proxy_timeout(profile):
    config = load(profile)
    timeout = config["http_options"]["request_timeout_s"]
    ingress = deployments(config)["Ingress"]
    assert ingress["user_config"]["request_timeout_s"] == timeout
    assert ingress["graceful_shutdown_timeout_s"] > timeout  # a replaced ingress finishes what it holds


@pytest.mark.parametrize("profile", PROFILES)
def test_admission_fits_the_ingress_with_room_for_health_checks(profile):
    ingress = deployments(load(profile))["Ingress"]
    admitted = sum(IngressConfig.model_validate(ingress["user_config"]).admission_limits().values())
    assert admitted + 16 <= ingress["max_ongoing_requests"]


def test_models_are_configured_per_deployment_not_in_the_app_args():
    """Serve hashes args into every deployment's version: a model change there would restart all of them."""
    for profile in PROFILES:
        config = load(profile)
        assert set(config["applications"][0]["args"]) <= {"require_gpus", "gpu_wait_s"}
        assert deployments(config)["VisionClassifier"]["user_config"]["model"]["source"].startswith("package:")
        assert deployments(config)["TextEncoder"]["user_config"]["model"]["source"].startswith("package:")


def test_bad_builder_args_fail_with_the_field_named():
    with pytest.raises(ConfigError, match="require_gpu"):
        build_app({"require_gpu": True})
    with pytest.raises(ConfigError, match="args.vision moved.*user_config of the VisionClassifier"):
        build_app({"vision": {"source": "package:x"}})


def test_bad_user_config_names_the_field():
    with pytest.raises(ValueError, match="class_prompt"):
        FusionConfig(class_prompt="no slot")
    with pytest.raises(ValueError, match="max_batch_size"):
        VisionSettings(max_batch_size=0)
    with pytest.raises(ValueError, match="drift.window_size"):
        VisionSettings.model_validate({"drift": {"window_size": 1}})
    with pytest.raises(ValueError, match="model.sourse"):
        TextSettings.model_validate({"model": {"sourse": "typo"}})
    with pytest.raises(ValueError, match="unknown routes"):
        IngressConfig.model_validate({"admission": {"/v1/nothing": 3}})
