"""The app as ``make serve`` runs it by default: HAProxy on the HTTP port, terminating TLS with a
certificate made here (``MAAS_TLS_CERTFILE``, ``MAAS_TLS_KEYFILE``), the ingress replicas serving HTTP
themselves behind it.

Runs in its own pytest process: Serve reads ``RAY_SERVE_ENABLE_HA_PROXY`` when its controller starts, so this
needs a Ray of its own, started by ``serve run`` (through the Makefile) in a session of its own. The HTTP port
and HAProxy's own (statistics, exporter) are moved off the defaults (8000, 8404, 9101).
"""

import os
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from deployments.haproxy import HARDENED_SUFFIX
from tests import serving
from tests.certificates import self_signed

ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT = int(os.environ.get("MAAS_TEST_HAPROXY_HTTP_PORT", "8014"))
HEADER_TIMEOUT_S = 2
START_TIMEOUT_S = 400


def pytest_collection_modifyitems(items):
    serving.mark_integration(item for item in items if "tests/haproxy" in str(item.fspath))


def haproxy_processes(sid: int, launchers: bool = False) -> list[psutil.Process]:
    """The HAProxy processes this test's server started (on the launcher's hardened configuration), and with
    ``launchers`` the launchers that have not yet replaced themselves with HAProxy (a reload under way)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        try:
            suffixes = (HARDENED_SUFFIX, "maas-haproxy") if launchers else (HARDENED_SUFFIX,)
            ours = any(part.endswith(suffixes) for part in cmdline)
            if ours and os.getsid(process.pid) == sid:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


class Server:
    """``make serve`` (its default ingress, HAProxy) in a session of its own."""

    def __init__(self, tmp: Path):
        config = serving.load_config("serve_config.yaml", HTTP_PORT)
        path = tmp / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        key, self.cert = self_signed(tmp)
        self.tls = ssl.create_default_context(cafile=str(self.cert))  # a client that trusts only it
        env = {
            **os.environ,
            "MAAS_TLS_CERTFILE": str(self.cert),
            "MAAS_TLS_KEYFILE": str(key),
            "MAAS_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            **serving.haproxy_ports(),
        }
        self.log = tmp / "serve.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                ["make", "-s", "serve", f"CONFIG={path}"],
                cwd=ROOT,
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.sid = self.process.pid
        self.url = f"https://127.0.0.1:{HTTP_PORT}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"make serve exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", verify=self.tls, timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"not ready within {START_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        """SIGTERM to the server's process group, as a process supervisor stops it."""
        if self.process.poll() is None:
            os.killpg(self.sid, signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.sid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    started = Server(tmp_path_factory.mktemp("haproxy"))
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()
        for process in haproxy_processes(started.sid, launchers=True):  # only if the test that checks this failed
            process.kill()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, verify=server.tls, timeout=60) as c:
        yield c
