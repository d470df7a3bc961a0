"""The shipped Serve configs are valid before anything is deployed."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.errors import ConfigError
from deployments.fusion import FusionConfig
from deployments.runtime import ModelSettings
from pipelines.multimodal import MultimodalArgs, build_app

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {"cpu": ROOT / "serve_config.yaml", "gpu": ROOT / "serve_config.gpu.yaml"}
USER_CONFIGS = {"VisionClassifier": ModelSettings, "TextEncoder": ModelSettings, "FusionScorer": FusionConfig}


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
        if name in USER_CONFIGS:
            assert deployment["user_config"]["max_batch_size"] <= deployment["max_ongoing_requests"], name


@pytest.mark.parametrize("profile", PROFILES)
def test_every_model_deployment_autoscales(profile):
    for name in USER_CONFIGS:
        autoscaling = deployments(load(profile))[name]["autoscaling_config"]
        assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]


def test_cpu_profile_asks_for_no_gpu():
    for deployment in deployments(load("cpu")).values():
        assert deployment["ray_actor_options"].get("num_gpus", 0) == 0


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


def test_cpu_reservations_fit_a_two_core_node_at_max_replicas():
    total = 0.0
    for deployment in deployments(load("cpu")).values():
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        total += replicas * deployment["ray_actor_options"]["num_cpus"]
    assert total <= 2.0


def test_bad_builder_args_fail_with_the_field_named():
    with pytest.raises(ConfigError, match="vision.sourse"):
        build_app({"vision": {"sourse": "typo"}})


def test_bad_user_config_names_the_field():
    with pytest.raises(ValueError, match="class_prompt"):
        FusionConfig(class_prompt="no slot")
    with pytest.raises(ValueError, match="max_batch_size"):
        ModelSettings(max_batch_size=0)
    with pytest.raises(ValueError, match="drift.window_size"):
        ModelSettings.model_validate({"drift": {"window_size": 1}})
