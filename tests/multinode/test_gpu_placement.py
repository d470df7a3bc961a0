"""Fractional GPUs on a multi-node cluster: packing, placement, and the CPU fallback."""

import httpx
import psutil
import pytest
from ray.util.state import list_actors

from deployments.haproxy import HARDENED_SUFFIX
from tests.conftest import b64
from tests.multinode.conftest import DASHBOARD_PORT, HTTP_PORT, INGRESS, VISION_REPLICAS, https_client
from tests.serving import APP, replica_infos


def replica_nodes(deployment: str) -> list[str]:
    # With an address, the state API does not go looking for (possibly several) local Rays.
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return [a.node_id for a in actors if a.class_name == f"ServeReplica:{APP}:{deployment}"]


@pytest.fixture(scope="module")
def vision_replicas(app) -> dict[str, dict]:
    """``info()`` of every vision replica, keyed by replica id."""
    return replica_infos("VisionClassifier", VISION_REPLICAS)


def test_four_quarter_gpu_replicas_pack_onto_one_gpu(cluster, vision_replicas):
    assert len(vision_replicas) == VISION_REPLICAS
    placements = {(i["placement"]["node"], tuple(i["placement"]["gpu_ids"])) for i in vision_replicas.values()}
    assert placements == {(cluster["gpu"], ("0",))}, placements
    assert sum(i["resources"]["GPU"] for i in vision_replicas.values()) == pytest.approx(1.0)


def test_gpu_replicas_only_on_the_gpu_node_and_the_ingress_on_the_cpu_node(cluster, app):
    assert set(replica_nodes("VisionClassifier")) == {cluster["gpu"]}
    assert set(replica_nodes("Ingress")) == {cluster["head"]}
    assert set(replica_nodes("FusionScorer")) == {cluster["head"]}


def test_yaml_actor_options_are_in_force(app, vision_replicas):
    expected = next(d for d in app["applications"][0]["deployments"] if d["name"] == "VisionClassifier")
    for info in vision_replicas.values():
        assert info["resources"]["GPU"] == expected["ray_actor_options"]["num_gpus"] == 0.25
        assert info["resources"]["CPU"] == expected["ray_actor_options"]["num_cpus"]


def test_answers_correctly_over_https_when_torch_sees_no_cuda(app, tls, vision_replicas, chelsea_jpeg, coffee_jpeg):
    assert {info["device"] for info in vision_replicas.values()} == {"cpu"}
    with https_client(tls, timeout=60) as client:
        labels = ["a photo of a cat", "a cup of coffee", "a rocket launch"]
        cat = client.post("/v1/multimodal/analyze", json={"image": b64(chelsea_jpeg), "labels": labels}).json()
        coffee = client.post("/v1/vision/classify", json={"image": b64(coffee_jpeg)}).json()
    assert cat["fused"][0]["label"] == "a photo of a cat"
    assert coffee["labels"][0]["label"] == "espresso"


def test_the_app_answers_only_over_https_with_its_certificate(app, tls):
    with https_client(tls, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port gets no HTTP answer
        httpx.get(f"http://127.0.0.1:{HTTP_PORT}/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # nor does a client not trusting it
        httpx.get(f"https://127.0.0.1:{HTTP_PORT}/healthz", timeout=10)


def _listening_on(port: int) -> list[str]:
    """The command lines of the processes listening on ``port``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in process.net_connections("tcp")):
                found.append(" ".join(process.info["cmdline"] or []))
        except psutil.Error:
            continue
    return found


def test_the_https_port_is_held_by_the_ingress_the_suite_runs_behind(app):
    """HAProxy on the launcher's hardened configuration by default (and no proxy actor on that port); with
    ``MAAS_TEST_MULTINODE_INGRESS=proxy``, Serve's HTTP proxy actor."""
    holders = _listening_on(HTTP_PORT)
    if INGRESS == "haproxy":
        assert holders and all(HARDENED_SUFFIX in cmdline for cmdline in holders), holders
    else:
        assert holders and all("ProxyActor" in cmdline for cmdline in holders), holders
