"""A local multi-node Ray cluster: a CPU-only head and a worker node that declares one (logical) GPU.

The GPU node carries the ``node-kind=gpu`` label that cluster.yaml gives GPU
workers, so the GPU profile's CPU-only deployments keep off it.

Runs in its own pytest process (see the Makefile): one driver can join only
one Ray cluster, and the other integration tests need one without GPUs.
The app is served over HTTPS with a certificate made here, as an operator would with a real one: by HAProxy on
the head node, as ``make serve`` runs it (``MAAS_TLS_*``), or with ``MAAS_TEST_MULTINODE_INGRESS=proxy`` by
Serve's HTTP proxy (``http_options.ssl_*``), as ``make serve INGRESS=proxy`` runs it.

The GPU is logical: Ray schedules and assigns it, but torch sees no CUDA
device, which is exactly the case where replicas must fall back to the CPU.
"""

import os
import ssl

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from tests import serving
from tests.certificates import self_signed

HTTP_PORT = int(os.environ.get("MAAS_TEST_MULTINODE_HTTP_PORT", "8011"))
DASHBOARD_PORT = int(os.environ.get("MAAS_TEST_MULTINODE_DASHBOARD_PORT", "8276"))
VISION_REPLICAS = 4
INGRESS = os.environ.get("MAAS_TEST_MULTINODE_INGRESS", "haproxy")  # or proxy


def pytest_collection_modifyitems(items):
    serving.mark_integration(items)


@pytest.fixture(scope="session")
def cluster(tls):
    serving.harden_proxies()
    if INGRESS == "haproxy":
        serving.haproxy_ingress(tls["cert"], tls["key"])
    elif INGRESS != "proxy":
        raise ValueError(f"MAAS_TEST_MULTINODE_INGRESS must be proxy or haproxy, not {INGRESS!r}")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": DASHBOARD_PORT,
        },
    )
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, labels={"node-kind": "gpu"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield {"head": cluster.head_node.node_id, "gpu": gpu_node.node_id, "cluster": cluster, "gpu_node": gpu_node}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> dict:
    """The certificate the app serves HTTPS with, as a client context that trusts only it."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = self_signed(folder)
    return {"key": key, "cert": cert, "context": ssl.create_default_context(cafile=str(cert))}


@pytest.fixture(scope="session")
def app(cluster, tls, tmp_path_factory) -> dict:
    """The GPU profile, served over HTTPS: Serve's HTTP proxy terminates TLS (``http_options.ssl_*``), or HAProxy
    (from the environment ``cluster`` set)."""
    config = serving.gpu_profile(HTTP_PORT, VISION_REPLICAS)
    if INGRESS == "proxy":
        config["http_options"] |= {"ssl_keyfile": str(tls["key"]), "ssl_certfile": str(tls["cert"])}
    serving.deploy(config, tmp_path_factory.mktemp("serve") / "gpu.yaml", DASHBOARD_PORT)
    return config


def https_client(tls: dict, **options) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{HTTP_PORT}", verify=tls["context"], **options)
