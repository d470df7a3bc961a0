"""What clients see while the cluster changes under them: the figures of the README's "Reliability" section.

Run against an app started with `make serve` (it changes the deployment and
restores it):

    .venv/bin/python -m benchmarks.reliability

Six closed-loop clients send vision, multimodal and text requests throughout.
One at a time: a new vision model version (a user_config change), a change to
the app's args (every replica replaced), and a vision replica killed with
SIGKILL. For each, every response is counted by status, with the latency p50,
p99 and maximum of the window it covers. Prints a Markdown table.
"""

import copy
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import yaml
from ray import serve
from ray.util.state import list_actors

from benchmarks.run import payloads

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("MAAS_URL", "http://127.0.0.1:8000")
APP = "multimodal"
CLIENTS = 6


class Load:
    def __init__(self):
        requests = payloads()
        text = {"text": "my cat asleep on the sofa", "labels": ["animals", "vehicles"]}
        self.routes = [
            ("/v1/vision/classify", requests["vision"]),
            ("/v1/multimodal/analyze", requests["multimodal"]),
            ("/v1/text/classify", text),
        ]
        self.log: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(CLIENTS)]

    def client(self, index: int) -> None:
        with httpx.Client(base_url=BASE, timeout=60) as client:
            n = index
            while not self.stop.is_set():
                route, payload = self.routes[n % len(self.routes)]
                n += 1
                start = time.monotonic()
                try:
                    status = client.post(route, json=payload).status_code
                except httpx.HTTPError:
                    status = 0
                self.log.append((start, status, time.monotonic() - start))

    def window(self, start: float, end: float) -> dict:
        rows = [(status, seconds) for sent, status, seconds in self.log if start <= sent <= end]
        latencies = np.array([seconds for _, seconds in rows]) * 1000
        statuses: dict[int, int] = {}
        for status, _ in rows:
            statuses[status] = statuses.get(status, 0) + 1
        return {
            "requests": len(rows),
            "statuses": dict(sorted(statuses.items())),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "max_ms": float(latencies.max()),
        }


def shipped() -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = int(BASE.rsplit(":", 1)[1])
    return config


def deploy(config: dict) -> float:
    """`serve deploy` and wait until the app is RUNNING on it; seconds taken."""
    start = time.monotonic()
    previous = serve.status().applications[APP].last_deployed_time_s
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "deploy", f.name],
        check=True,
        capture_output=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    while True:
        status = serve.status().applications[APP]
        if status.last_deployed_time_s > previous and status.status == "RUNNING":
            return time.monotonic() - start
        time.sleep(0.5)


def running(name: str) -> int:
    return serve.status().applications[APP].deployments[name].replica_states.get("RUNNING", 0)


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def main() -> None:
    ray.init(address="auto", log_to_driver=False)
    load = Load()
    for thread in load.threads:
        thread.start()
    rows = []
    try:
        time.sleep(10)
        start = time.monotonic()
        time.sleep(20)
        rows.append(("steady load, no change", load.window(start, time.monotonic()), None))

        new_version = shipped()
        deployment(new_version, "VisionClassifier")["user_config"]["model"]["version"] = "mobilenet_v2-next"
        start = time.monotonic()
        took = deploy(new_version)
        time.sleep(5)
        rows.append(("new vision model version (user_config)", load.window(start, time.monotonic()), took))

        new_args = copy.deepcopy(new_version)
        new_args["applications"][0]["args"]["gpu_wait_s"] = 1
        start = time.monotonic()
        took = deploy(new_args)
        time.sleep(5)
        rows.append(("app args changed: every replica replaced", load.window(start, time.monotonic()), took))

        victim = next(
            a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.endswith(":VisionClassifier")
        )
        start = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        # Until Serve has noticed the loss (fewer than 2 running) and replaced the replica (2 again).
        for noticed in (lambda n: n < 2, lambda n: n >= 2):
            while not noticed(running("VisionClassifier")) and time.monotonic() - start < 120:
                time.sleep(0.2)
        took = time.monotonic() - start
        time.sleep(5)
        rows.append(("a vision replica killed (SIGKILL)", load.window(start, time.monotonic()), took))
    finally:
        load.stop.set()
        for thread in load.threads:
            thread.join()
        deploy(shipped())

    print("| event | requests | statuses | p50 | p99 | max | took |")
    print("|---|---|---|---|---|---|---|")
    for event, w, took in rows:
        statuses = ", ".join(f"{n} x {s}" for s, n in w["statuses"].items())
        print(
            f"| {event} | {w['requests']} | {statuses} | {w['p50_ms']:.0f} ms | {w['p99_ms']:.0f} ms | "
            f"{w['max_ms']:.0f} ms | {f'{took:.0f} s' if took else ''} |"
        )


if __name__ == "__main__":
    main()
