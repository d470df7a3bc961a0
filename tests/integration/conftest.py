"""One real local Ray for the whole session, with the app deployed from serve_config.yaml.

The app is deployed exactly as the README says, with ``serve deploy``, against
a Ray started without GPUs, behind the ingress ``make serve`` runs (HAProxy), or
with ``MAAS_TEST_INGRESS=proxy`` behind Serve's Python proxy (the Makefile runs
the overload and slow-client tests there again so). Only the HTTP port is moved
off 8000 so the suite can run beside ``make serve``.
"""

import os
import sys
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from tests import serving
from tests.integration.prometheus import running
from tests.serving import APP

HTTP_PORT = int(os.environ.get("MAAS_TEST_HTTP_PORT", "8010"))
DASHBOARD_PORT = int(os.environ.get("MAAS_TEST_DASHBOARD_PORT", "8275"))
# As `make serve` runs it (HAProxy), or behind Serve's Python proxy (`make serve INGRESS=proxy`).
INGRESS = os.environ.get("MAAS_TEST_INGRESS", "haproxy")


def pytest_collection_modifyitems(items):
    serving.mark_integration(item for item in items if "tests/integration" in str(item.fspath))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with two CPUs and no GPU, like the machines this runs on.

    Started with the virtualenv first on PATH, as from an activated venv, so
    that ``python`` in a job's entrypoint is the project's interpreter.
    """
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    serving.harden_proxies()
    if INGRESS == "haproxy":
        serving.haproxy_ingress()
    elif INGRESS != "proxy":
        raise ValueError(f"MAAS_TEST_INGRESS must be proxy or haproxy, not {INGRESS!r}")
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=DASHBOARD_PORT,
        log_to_driver=False,
        # Export metrics every 2 s instead of 10 s, so the Prometheus test waits less.
        _system_config={"metrics_report_interval_ms": 2000},
    )
    yield
    serve.shutdown()
    ray.shutdown()


def shipped_config() -> dict:
    return serving.load_config("serve_config.yaml", HTTP_PORT)


def deploy(config: dict, path) -> None:
    serving.deploy(config, path, DASHBOARD_PORT)


def replicas(deployment: str) -> int:
    """RUNNING replicas of a deployment, from Serve's status API."""
    return serving.serve_status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="session")
def app_url(ray_cluster, tmp_path_factory) -> str:
    deploy(shipped_config(), tmp_path_factory.mktemp("serve") / "serve_config.yaml")
    return f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="session")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def prometheus(app_url, tmp_path_factory):
    """A real Prometheus scraping this session's Ray, for one test module."""
    with running(tmp_path_factory.mktemp("prometheus")) as server:
        yield server


@pytest.fixture
def ingress_peak_growth_mib():
    """Resets the ingress replicas' peak RSS (Linux clear_refs 5); yields a function giving its growth since."""
    pids = list(serving.replica_actors("Ingress").values())
    baseline = {}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        baseline[pid] = serving.kib(pid, "VmRSS")
    yield lambda: max((serving.kib(pid, "VmHWM") - baseline[pid]) / 1024 for pid in pids)
