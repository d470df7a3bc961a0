"""A local Ray cluster whose node autoscaler launches GPU workers on demand.

The head has 2 CPUs and no GPU. One worker type, ``gpu_worker`` (2 CPUs, 1
logical GPU, label ``node-kind=gpu`` as in cluster.yaml), scales between 0 and
2 nodes. Ray's fake multi-node provider plays the cloud: when the autoscaler
launches a node, the provider starts a real extra raylet on this machine.

Runs in its own pytest process (one driver joins one cluster): it starts its
own head with ``ray start`` on its own ports and temp dir, so a Ray of another
test run or of ``make serve`` on this machine is left alone.
"""

import os

# Before Ray is imported: a driver that joins a running cluster sends the token
# only in token mode, and Ray reads the mode once, when it is imported.
os.environ["RAY_AUTH_MODE"] = "token"

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from tests import serving  # noqa: E402
from tests.ports import free_port  # noqa: E402

HTTP_PORT = int(os.environ.get("MAAS_TEST_NODESCALING_HTTP_PORT", "8012"))
DASHBOARD_PORT = int(os.environ.get("MAAS_TEST_NODESCALING_DASHBOARD_PORT", "8277"))
GCS_PORT = int(os.environ.get("MAAS_TEST_NODESCALING_GCS_PORT", "6390"))
GPU_WORKER = "gpu_worker"
VISION_REPLICAS = 4  # quarter-GPU replicas: exactly one GPU node's worth
RAY = str(Path(sys.executable).parent / "ray")
STOP_GRACE_S = 10  # per step, as ray stop gives each of its three


def pytest_collection_modifyitems(items):
    serving.mark_integration(item for item in items if "tests/nodescaling" in str(item.fspath))


def autoscaling_config(gcs_address: str) -> dict:
    """The cluster config the head's autoscaler runs with (what the cluster launcher would bootstrap)."""
    return {
        "cluster_name": "maas-nodescaling",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            # Workers join this head, not the default port 6379.
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            GPU_WORKER: {
                "resources": {"CPU": 2, "GPU": 1},
                "labels": {"node-kind": "gpu"},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        # Long enough that no worker is taken away while the tests run.
        "idle_timeout_minutes": 10,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _check_free(port: int, variable: str) -> None:
    with socket.socket() as sock:
        # As the servers do: connections of an earlier run, still in TIME_WAIT, do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            pytest.fail(f"port {port} is in use; set {variable} to a free port")


def _session_processes(sid: int) -> list[int]:
    """Live processes of a session (zombies, already dead, are left out)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # exited meanwhile
        if state != "Z":
            pids.append(int(entry))
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(sid: int, pids: list[int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL for whichever of ``pids`` is still running after ``grace_s``."""
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (alive := set(pids) & set(_session_processes(sid))) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal(list(alive), signal.SIGKILL)


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stop_cluster(sid: int) -> None:
    """Stop every process of this cluster, and nothing else.

    ``ray stop`` is no use here: it takes no address or temp dir and stops every
    Ray on the machine, including one of another test run or of ``make serve``.
    Instead the head is started in a session of its own (``start_new_session``),
    and every process of the cluster stays in that session: the head's daemons,
    the worker raylets the autoscaler's provider starts, and all their workers
    (Ray gives workers their own process group, not their own session). So the
    session id names exactly this cluster's processes.

    They are stopped in ``ray stop``'s order: raylets (and with them their
    workers), then the other daemons, then the GCS, which the others still talk
    to while they exit (signalled together with the GCS, the autoscaler's
    monitor and the GCS both outlived a 20 s grace period).
    """
    assert sid != os.getsid(0), "refusing to signal the test runner's own session"
    raylets = [p for p in _session_processes(sid) if _program(p) == "raylet"]
    _stop(sid, raylets, STOP_GRACE_S)
    others = [p for p in _session_processes(sid) if _program(p) != "gcs_server"]
    _stop(sid, others, STOP_GRACE_S)
    _stop(sid, _session_processes(sid), STOP_GRACE_S)


@pytest.fixture(scope="session")
def cluster():
    """The head node, started with ``ray start --head --autoscaling-config``, and this driver connected to it."""
    _check_free(GCS_PORT, "MAAS_TEST_NODESCALING_GCS_PORT")
    _check_free(DASHBOARD_PORT, "MAAS_TEST_NODESCALING_DASHBOARD_PORT")
    _check_free(HTTP_PORT, "MAAS_TEST_NODESCALING_HTTP_PORT")
    # Short, because Ray's Unix socket paths live under it.
    temp_dir = Path(tempfile.mkdtemp(prefix="maas-ns-"))
    address = f"{ray.util.get_node_ip_address()}:{GCS_PORT}"
    config_path = temp_dir / "autoscaling.json"
    config_path.write_text(json.dumps(autoscaling_config(address)))
    command = [
        RAY,
        "start",
        "--head",
        f"--autoscaling-config={config_path}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--port={GCS_PORT}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        # Off the defaults (52365, 10001), which another Ray on this machine may hold.
        f"--dashboard-agent-listen-port={free_port('')}",
        f"--ray-client-server-port={free_port('')}",
        "--disable-usage-stats",
    ]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        **serving.PROXY_HARDENING,
        # Lets the fake provider run, and gives the head the node id the provider expects.
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    log = temp_dir / "ray-start.log"
    # Output to a file, not a pipe: the daemons ray start leaves behind would hold a pipe open.
    with log.open("w") as out:
        head = subprocess.Popen(command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        if head.wait(timeout=120) != 0:
            pytest.fail(f"ray start failed:\n{log.read_text()}")
        ray.init(address=address, log_to_driver=False)
        head_id = ray.get_runtime_context().get_node_id()
        yield {"address": address, "head": head_id}
    finally:
        ray.shutdown()
        if head.poll() is None:
            head.kill()
            head.wait()
        stop_cluster(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def alive_nodes() -> dict[str, dict]:
    """Alive nodes from ``ray.nodes()``, keyed by node id."""
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def gpu_workers() -> dict[str, dict]:
    return {i: n for i, n in alive_nodes().items() if n["Labels"].get("node-kind") == "gpu"}


def replica_nodes(deployment: str) -> list[str]:
    """The node of every alive replica actor of a deployment."""
    # With no address, the state API looks for a local Ray by itself, and fails when it finds two.
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return [a.node_id for a in actors if a.class_name == f"ServeReplica:{serving.APP}:{deployment}"]


def active_by_type(address: str) -> dict[str, int]:
    """Launched and running nodes per node type, as the autoscaler reports them (``ray status``)."""
    status = subprocess.run(
        [RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return {name: int(count) for count, name in re.findall(r"^\s*(\d+)\s+(\S+)\s*$", active, re.MULTILINE)}


def wait_for_active(address: str, expected: dict[str, int], timeout_s: float = 60) -> dict[str, int]:
    """``active_by_type`` once it equals ``expected`` (the autoscaler reports every second or so)."""
    deadline = time.monotonic() + timeout_s
    while (active := active_by_type(address)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    return active


def gpu_profile(vision_replicas: int) -> dict:
    """The test GPU profile (tests/serving.py) with ``require_gpus`` off.

    With it on, the app builder waits for a GPU node before any replica
    exists, so no replica asks for a GPU, and the autoscaler, which launches
    nodes only for resources that something asks for, launches none. Here the
    vision replicas themselves wait for a GPU, and their request is what
    brings a GPU worker up.
    """
    return serving.gpu_profile(HTTP_PORT, vision_replicas, require_gpus=False)


@pytest.fixture(scope="session")
def serve_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="session")
def app(cluster, serve_dir) -> dict:
    """The GPU profile deployed with ``serve deploy`` onto the cluster, which had no GPU worker until then."""
    config = gpu_profile(VISION_REPLICAS)
    serving.deploy(config, serve_dir / "gpu.yaml", DASHBOARD_PORT)
    return config
