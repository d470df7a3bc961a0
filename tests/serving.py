"""Deploying the app onto a test cluster the way the README does: ``serve deploy`` of a YAML."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml
from ray import serve

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
APP = "multimodal"
DEPLOY_TIMEOUT_S = 400
# As `make serve`, cluster.yaml and the image set it: Serve's HTTP proxy loads deployments/proxy.py.
PROXY_HARDENING = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy:hardening"}


_STATUS_LOCK = threading.Lock()


def serve_status():
    """``serve.status()``, one call at a time in this process.

    Ray 2.60's ``status()`` registers the autoscaling policy's module with
    cloudpickle for pickling by value and unregisters it again, in a set shared
    by the whole process: two threads calling it at once (a test's replica
    watcher and its deploy) fail with "... is not registered for pickle by value".
    """
    with _STATUS_LOCK:
        return serve.status()


def harden_proxies() -> None:
    """Make the Ray started next from this process load the proxy hardening (its processes inherit this env)."""
    os.environ.update(PROXY_HARDENING)


def haproxy_ingress(certfile: Path | None = None, keyfile: Path | None = None) -> None:
    """Make the Ray started next from this process serve HTTP through HAProxy as ``make serve INGRESS=haproxy``
    does, terminating TLS with these files if given; HAProxy's own ports (statistics, exporter) and Serve's
    fallback proxy's moved off their defaults."""
    if certfile is not None:
        os.environ.update({"MAAS_TLS_CERTFILE": str(certfile), "MAAS_TLS_KEYFILE": str(keyfile)})
    os.environ.update(
        {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(Path(sys.executable).parent / "maas-haproxy"),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "10",
            **haproxy_ports(),
        }
    )


def haproxy_ports() -> dict[str, str]:
    """HAProxy's own listeners (statistics, exporter) and Serve's fallback proxy, moved off their defaults
    (8404, 9101, 8500) so a test's app can run beside ``make serve``."""
    return {
        variable: str(free_port())
        for variable in (
            "RAY_SERVE_HAPROXY_STATS_PORT",
            "RAY_SERVE_HAPROXY_METRICS_PORT",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        )
    }


def load_config(name: str, http_port: int) -> dict:
    """A shipped Serve config with only the HTTP port changed, so tests can run beside ``make serve``."""
    config = yaml.safe_load((ROOT / name).read_text())
    config["http_options"]["port"] = http_port
    return config


def deploy(config: dict, path: Path, dashboard_port: int) -> None:
    """``serve deploy`` a config and wait until the controller has applied it and the app is RUNNING."""
    path.write_text(yaml.safe_dump(config))
    previous = serve_status().applications.get(APP)
    previous_deploy_time = previous.last_deployed_time_s if previous else 0.0
    subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", f"http://127.0.0.1:{dashboard_port}"],
        cwd=ROOT,
        check=True,
        timeout=120,
        # As in the README: the CLI sends the cluster's token from ~/.ray/auth_token.
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve_status().applications.get(APP)
        if status and status.last_deployed_time_s <= previous_deploy_time:
            pass  # the controller has not applied this config yet
        elif status and status.status == "RUNNING":
            return
        elif status and status.status == "DEPLOY_FAILED":
            pytest.fail(f"deploy failed: {status.message}")
        time.sleep(1)
    pytest.fail(f"app not RUNNING after {DEPLOY_TIMEOUT_S}s: {serve_status()}")


def mark_integration(items) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


def replica_infos(deployment: str, replicas: int, timeout_s: float = 60) -> dict[str, dict]:
    """``info()`` of every replica of a deployment, keyed by replica id (asked until all have answered).

    Keeps asking for up to ``timeout_s``: right after a deploy, a handle's router
    can briefly know fewer replicas than are running.
    """
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = handle.info.remote().result()
        seen[info["placement"]["replica"]] = info
        if len(seen) == replicas:
            return seen
        time.sleep(0.02)
    pytest.fail(f"only {len(seen)} of {replicas} {deployment} replicas answered info() in {timeout_s} s")


def kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc (VmHWM: its peak resident set since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def replica_actors(deployment: str) -> dict[str, int]:
    """Process id of each live replica actor of a deployment, by actor id (from Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])
    return {actor.actor_id: actor.pid for actor in actors}


def gpu_profile(http_port: int, vision_replicas: int, require_gpus: bool = True) -> dict:
    """serve_config.gpu.yaml with a fixed number of vision replicas, and the other models on the CPU so only vision
    needs a GPU."""
    config = load_config("serve_config.gpu.yaml", http_port)
    (app,) = config["applications"]
    app["args"]["require_gpus"] = require_gpus
    deployments = {d["name"]: d for d in app["deployments"]}
    vision = deployments["VisionClassifier"]
    vision.pop("autoscaling_config")
    vision["num_replicas"] = vision_replicas
    vision["ray_actor_options"]["num_cpus"] = 0.25
    deployments["TextEncoder"]["ray_actor_options"]["num_gpus"] = 0
    deployments["TextGenerator"]["ray_actor_options"]["num_gpus"] = 0
    deployments["Explainer"]["ray_actor_options"]["num_gpus"] = 0
    deployments["SpeechRecognizer"]["ray_actor_options"]["num_gpus"] = 0
    # Placement and node loss need one replica of the rest; two each (for updates) only slow the start.
    for name in ("TextEncoder", "FusionScorer", "TextReader", "TextGenerator", "Explainer", "SpeechRecognizer",
                 "SpeechSynthesizer"):  # fmt: skip
        deployments[name]["autoscaling_config"] |= {"min_replicas": 1, "max_replicas": 1}
    deployments["Ingress"]["num_replicas"] = 1
    return config


def prometheus_tool(name: str) -> str:
    """Path of ``prometheus`` or ``promtool`` (Debian's prometheus package)."""
    path = shutil.which(name)
    if path is None:
        missing_system_package(name, "prometheus")
    return path


def missing_system_package(what: str, package: str) -> None:
    """A Debian package a test reads is not installed: skipped with the reason ``make test`` recorded when it
    could not install it (tests/install_tools.sh), a failure under CI otherwise, else skipped."""
    report = Path(os.environ.get("MAAS_TEST_TOOLS_MISSING", ROOT / ".venv" / ".test-tools-missing"))
    if report.is_file():
        pytest.skip(f"{what} could not be installed: {report.read_text().strip()}")
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed; `make test` installs Debian's {package} package, which provides it")
    pytest.skip(f"{what} is not installed (apt-get install {package}, or run `make test`)")


def session_logs_dir() -> Path:
    """The logs folder of the Ray session this driver joined (every file Ray and the replicas write)."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def metrics_exposition() -> str:
    """What Prometheus would scrape now: every Ray node's metrics endpoint, from Ray's service-discovery file."""
    import json

    import httpx

    targets = json.loads(Path("/tmp/ray/prom_metrics_service_discovery.json").read_text())
    pages = []
    for group in targets:
        for target in group["targets"]:
            pages.append(httpx.get(f"http://{target}/metrics", timeout=30).text)
    return "\n".join(pages)


def openai_refusal(call) -> openai.APIStatusError:
    """The error OpenAI's client raises for ``call()``, checked to be in OpenAI's shape."""
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    error = raised.value
    assert set(error.body) == {"message", "type", "param", "code"}, error.body  # the client unwraps "error"
    return error
