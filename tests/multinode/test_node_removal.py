"""A GPU worker node goes away: its replicas start again on the GPU node that is left, and the API keeps answering.

Runs after test_gpu_placement.py (it changes the cluster): a second GPU node
joins, then the node that hosts every vision replica is removed while clients
send requests.
"""

import threading
import time
from pathlib import Path

from ray.util.state import get_node

from tests.conftest import b64
from tests.multinode.conftest import DASHBOARD_PORT, VISION_REPLICAS, https_client
from tests.multinode.test_gpu_placement import replica_nodes
from tests.serving import APP, serve_status

RECOVERY_TIMEOUT_S = 180
VISION = "/v1/vision/classify"


def running(deployment: str) -> int:
    return serve_status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


def node_death(node) -> str | None:
    """Why Ray's GCS holds ``node`` dead, with the last lines of its raylet's log; None while it is alive.

    The recovery can only be judged while the node the replicas move to lives: if it dies too, the
    failure must say so (and why), not read as replicas that never came back.
    """
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    state = get_node(node.node_id, address=address)
    if state.state == "ALIVE":
        return None
    logs = Path(node.get_logs_dir_path())
    tails = []
    for log in sorted(logs.glob("raylet*.out")):
        lines = log.read_text(errors="replace").splitlines()
        if any(node.node_id in line for line in lines[:200]):
            tails = [line for line in lines if " W " in line or " E " in line or " C " in line][-20:]
    gcs = [
        line
        for line in (logs / "gcs_server.out").read_text(errors="replace").splitlines()
        if node.node_id in line and ("health" in line.lower() or "dead" in line.lower())
    ]
    return "\n".join([f"{state.state}: {state.state_message}", "gcs:", *gcs[:8], "raylet:", *tails])


def test_replicas_of_a_removed_node_restart_elsewhere_and_the_api_keeps_answering(
    cluster, app, tls, chelsea_jpeg, capsys
):
    spare = cluster["cluster"].add_node(num_cpus=2, num_gpus=1, labels={"node-kind": "gpu"})
    cluster["cluster"].wait_for_nodes()
    assert set(replica_nodes("VisionClassifier")) == {cluster["gpu"]}

    payload = {"image": b64(chelsea_jpeg), "top_k": 1}
    results: list[tuple[float, str, int, dict]] = []
    stop = threading.Event()

    def client(route: str) -> None:
        with https_client(tls, timeout=60) as http:
            while not stop.is_set():
                if route == "/healthz":
                    response = http.get(route)
                else:
                    response = http.post(route, json=payload)
                results.append((time.monotonic(), route, response.status_code, dict(response.headers)))
                time.sleep(0.2 if route == "/healthz" else 0)

    threads = [threading.Thread(target=client, args=(r,)) for r in ("/healthz", VISION, VISION)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        removed_at = time.monotonic()
        cluster["cluster"].remove_node(cluster["gpu_node"], allow_graceful=False)
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            if running("VisionClassifier") == VISION_REPLICAS and set(replica_nodes("VisionClassifier")) == {
                spare.node_id
            }:
                break
            if node_death(spare):
                break  # nothing left to recover onto: said below
            time.sleep(1)
        recovered_at = time.monotonic()
        time.sleep(5)  # serve for a while on the new node
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    death = node_death(spare)
    assert death is None, f"the spare node the replicas were to move to died during the test:\n{death}"
    assert set(replica_nodes("VisionClassifier")) == {spare.node_id}
    assert running("VisionClassifier") == VISION_REPLICAS
    health = [status for _, route, status, _ in results if route == "/healthz"]
    assert health and set(health) == {200}, "the ingress stopped answering"
    vision = [(t, status, headers) for t, route, status, headers in results if route == VISION]
    after = [status for t, status, _ in vision if t > recovered_at]
    assert after and set(after) == {200}, f"after recovery: {after}"
    refused = [(status, headers) for t, status, headers in vision if status != 200]
    # While no vision replica was alive, requests were refused with a retryable status, not left hanging.
    assert all(status == 503 and "retry-after" in headers for status, headers in refused), refused[:3]
    assert all(removed_at <= t <= recovered_at for t, status, _ in vision if status != 200)
    during = [status for t, status, _ in vision if removed_at <= t <= recovered_at]
    with capsys.disabled():
        print(
            f"\nnode removed: replicas back on the spare node after {recovered_at - removed_at:.0f} s; meanwhile "
            f"{len(during)} vision requests: {during.count(200)} x 200, {during.count(503)} x 503 (Retry-After); "
            f"{len(health)} /healthz probes, all 200"
        )
