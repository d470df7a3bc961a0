"""A real Prometheus (Debian's package) for the integration tests: the project's config (monitoring/prometheus.yml:
Ray's service-discovery file) and alert rules, scraping every two seconds, asked through its HTTP API."""

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving import ROOT, prometheus_tool

PROMETHEUS_PORT = int(os.environ.get("MAAS_TEST_PROMETHEUS_PORT", "9095"))
SERVICE_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")


class Prometheus:
    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> float:
        """Sum of an instant vector; 0 when it is empty."""
        response = self.client.get("/api/v1/query", params={"query": expr})
        response.raise_for_status()
        return sum(float(sample["value"][1]) for sample in response.json()["data"]["result"])

    def wait_for(self, expr: str, predicate, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.query(expr)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(1)

    def stable(self, exprs: dict[str, str], quiet_s: float = 12, timeout_s: float = 90) -> dict[str, float]:
        """The values once none has changed for ``quiet_s`` (over two scrapes) with every target up (all
        earlier traffic exported and scraped; a target that is down would hide its series from the sums)."""
        deadline = time.monotonic() + timeout_s

        def read() -> dict[str, float] | None:
            return {name: self.query(e) for name, e in exprs.items()} if self.query("min(up)") == 1 else None

        values, since = read(), time.monotonic()
        while (values is None or time.monotonic() - since < quiet_s) and time.monotonic() < deadline:
            time.sleep(1)
            latest = read()
            if latest is None or latest != values:
                values, since = latest, time.monotonic()
        assert values is not None, f"a scrape target stayed down for {timeout_s} s"
        return values

    def metric_names(self) -> set[str]:
        return set(self.client.get("/api/v1/label/__name__/values").json()["data"])


@contextlib.contextmanager
def running(folder: Path) -> Iterator[Prometheus]:
    """A real Prometheus with the project's config and alert rules, scraping every Ray node of this session."""
    binary = prometheus_tool("prometheus")
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    (sd_file,) = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert Path(sd_file) == SERVICE_DISCOVERY and SERVICE_DISCOVERY.exists(), "Ray did not write its SD file"
    # Scraped often so the tests wait little, but not every second: a scrape times out at its interval, and
    # the node's exposition reached 3.7 MB (0.5 s to render) while fuzzing here, so a 1 s scrape of a busy
    # node late in the suite timed out and left the node's target down.
    # Late in the suite the node's exposition took longer than 2 s to scrape (a whole test module's scrapes timed
    # out at 2.000 s, so its series were missing): 5 s.
    config["global"] |= {"scrape_interval": "5s", "scrape_timeout": "5s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "monitoring" / "alerts.yml")]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {(folder / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
