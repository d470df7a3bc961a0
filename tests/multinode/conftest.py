"""A local multi-node Ray cluster: a CPU-only head and a worker node that declares one (logical) GPU.

The GPU node carries the ``node-kind=gpu`` label that cluster.yaml gives GPU
workers, so the GPU profile's CPU-only deployments keep off it.

Runs in its own pytest process (see the Makefile): one driver can join only
one Ray cluster, and the other integration tests need one without GPUs.
The app is served over HTTPS with a certificate made here, as an operator would with a real one.

The GPU is logical: Ray schedules and assigns it, but torch sees no CUDA
device, which is exactly the case where replicas must fall back to the CPU.
"""

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import httpx
import pytest
import ray
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from ray import serve
from ray.cluster_utils import Cluster

from tests import serving

HTTP_PORT = int(os.environ.get("MAAS_TEST_MULTINODE_HTTP_PORT", "8011"))
DASHBOARD_PORT = int(os.environ.get("MAAS_TEST_MULTINODE_DASHBOARD_PORT", "8276"))
VISION_REPLICAS = 4


def pytest_collection_modifyitems(items):
    serving.mark_integration(items)


@pytest.fixture(scope="session")
def cluster():
    serving.harden_proxies()
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


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A private key and a self-signed certificate for 127.0.0.1 and localhost, made here (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "maas-cluster test")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> dict:
    """The certificate the app serves HTTPS with, as a client context that trusts only it."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = self_signed(folder)
    return {"key": key, "cert": cert, "context": ssl.create_default_context(cafile=str(cert))}


@pytest.fixture(scope="session")
def app(cluster, tls, tmp_path_factory) -> dict:
    """The GPU profile, served over HTTPS: Serve's HTTP proxy terminates TLS (``http_options.ssl_*``)."""
    config = serving.gpu_profile(HTTP_PORT, VISION_REPLICAS)
    config["http_options"] |= {"ssl_keyfile": str(tls["key"]), "ssl_certfile": str(tls["cert"])}
    serving.deploy(config, tmp_path_factory.mktemp("serve") / "gpu.yaml", DASHBOARD_PORT)
    return config


def https_client(tls: dict, **options) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{HTTP_PORT}", verify=tls["context"], **options)
