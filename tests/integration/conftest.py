"""One real local Ray for the whole session, with the app deployed from serve_config.yaml.

The app is deployed exactly as the README says, with ``serve deploy``, against
a Ray started without GPUs. Only the HTTP port is moved off 8000 so the suite
can run beside ``make serve``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

ROOT = Path(__file__).resolve().parents[2]
APP = "multimodal"
HTTP_PORT = int(os.environ.get("MAAS_TEST_HTTP_PORT", "8010"))
DASHBOARD_PORT = int(os.environ.get("MAAS_TEST_DASHBOARD_PORT", "8275"))
DEPLOY_TIMEOUT_S = 300


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with two CPUs and no GPU, like the machines this runs on."""
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=DASHBOARD_PORT,
        log_to_driver=False,
    )
    yield
    serve.shutdown()
    ray.shutdown()


def shipped_config() -> dict:
    """serve_config.yaml with only the HTTP port changed."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = HTTP_PORT
    return config


def deploy(config: dict, path: Path) -> None:
    """``serve deploy`` a config, as the README does, and wait until the app is RUNNING."""
    path.write_text(yaml.safe_dump(config))
    previous = serve.status().applications.get(APP)
    previous_deploy_time = previous.last_deployed_time_s if previous else 0.0
    serve_cli = Path(sys.executable).parent / "serve"
    subprocess.run(
        [str(serve_cli), "deploy", str(path), "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"],
        cwd=ROOT,
        check=True,
        timeout=120,
        # As in the README: the CLI sends the cluster's token from ~/.ray/auth_token.
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status and status.last_deployed_time_s <= previous_deploy_time:
            pass  # the controller has not applied this config yet
        elif status and status.status == "RUNNING":
            return
        if status and status.status == "DEPLOY_FAILED":
            pytest.fail(f"deploy failed: {status.message}")
        time.sleep(1)
    pytest.fail(f"app not RUNNING after {DEPLOY_TIMEOUT_S}s: {serve.status()}")


def replicas(deployment: str) -> int:
    """RUNNING replicas of a deployment, from Serve's status API."""
    return serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="session")
def app_url(ray_cluster, tmp_path_factory) -> str:
    deploy(shipped_config(), tmp_path_factory.mktemp("serve") / "serve_config.yaml")
    return f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="session")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        yield c
