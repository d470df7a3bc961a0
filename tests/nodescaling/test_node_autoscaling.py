"""The node autoscaler adds GPU workers when vision replicas cannot be placed, and the replicas start there.

The cluster starts with its head only, which has no GPU. Deploying the GPU
profile leaves the quarter-GPU vision replicas pending; the autoscaler sees
their demand and launches a ``gpu_worker``, where all four start. Raising
vision to eight replicas fills that node's GPU, so a second ``gpu_worker`` is
launched for the other four. The tests run in this order and build on each
other.
"""

import httpx
import pytest
import ray

from tests.conftest import b64
from tests.nodescaling.conftest import (
    DASHBOARD_PORT,
    GPU_WORKER,
    HTTP_PORT,
    VISION_REPLICAS,
    alive_nodes,
    gpu_profile,
    gpu_workers,
    replica_nodes,
    wait_for_active,
)
from tests.serving import APP, deploy, replica_infos, serve_status

HEAD_TYPE = "ray.head.default"


def classify(image: bytes) -> dict:
    with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=60) as client:
        response = client.post("/v1/vision/classify", json={"image": b64(image), "top_k": 1})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_cluster_starts_without_a_gpu_worker(cluster):
    assert set(alive_nodes()) == {cluster["head"]}
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert wait_for_active(cluster["address"], {HEAD_TYPE: 1}) == {HEAD_TYPE: 1}


def test_pending_gpu_replicas_bring_up_a_gpu_worker_and_start_on_it(cluster, app):
    workers = gpu_workers()
    assert len(workers) == 1, workers
    ((worker, node),) = workers.items()
    assert node["Resources"]["GPU"] == 1 and node["Resources"]["CPU"] == 2
    assert wait_for_active(cluster["address"], {HEAD_TYPE: 1, GPU_WORKER: 1}) == {HEAD_TYPE: 1, GPU_WORKER: 1}

    assert replica_nodes("VisionClassifier") == [worker] * VISION_REPLICAS
    for deployment in ("Ingress", "FusionScorer", "TextEncoder"):
        assert set(replica_nodes(deployment)) == {cluster["head"]}, deployment
    infos = replica_infos("VisionClassifier", VISION_REPLICAS)
    assert {(i["placement"]["node"], tuple(i["placement"]["gpu_ids"])) for i in infos.values()} == {(worker, ("0",))}
    assert sum(i["resources"]["GPU"] for i in infos.values()) == pytest.approx(1.0)


def test_the_api_answers_from_the_new_node(app, chelsea_jpeg):
    assert classify(chelsea_jpeg)["labels"][0]["label"] == "Egyptian cat"


def test_more_replicas_than_one_gpu_holds_bring_up_a_second_gpu_worker(cluster, app, serve_dir, chelsea_jpeg):
    (first,) = gpu_workers()
    before = replica_infos("VisionClassifier", VISION_REPLICAS)

    deploy(gpu_profile(2 * VISION_REPLICAS), serve_dir / "gpu-8.yaml", DASHBOARD_PORT)
    replicas = serve_status().applications[APP].deployments["VisionClassifier"].replica_states
    assert replicas.get("RUNNING") == 2 * VISION_REPLICAS, replicas

    workers = gpu_workers()
    assert len(workers) == 2 and first in workers, workers
    (second,) = set(workers) - {first}
    assert wait_for_active(cluster["address"], {HEAD_TYPE: 1, GPU_WORKER: 2}) == {HEAD_TYPE: 1, GPU_WORKER: 2}
    assert sorted(replica_nodes("VisionClassifier")) == sorted([first, second] * VISION_REPLICAS)

    after = replica_infos("VisionClassifier", 2 * VISION_REPLICAS)
    # The first four keep running where they were; the four new ones are on the new node.
    assert {r: after[r]["placement"]["node"] for r in before} == dict.fromkeys(before, first)
    assert {after[r]["placement"]["node"] for r in set(after) - set(before)} == {second}
    assert classify(chelsea_jpeg)["labels"][0]["label"] == "Egyptian cat"
