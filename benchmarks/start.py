"""Where a cold start goes: ``serve run`` to the first multimodal answer, when each replica began serving, and
the CPU and memory each deployment's replicas had used by then (benchmarks/NOTES.md, "The cold start").

Run: ``.venv/bin/python -m benchmarks.start [KEY=VALUE ...]`` with nothing else running. It starts
``serve run serve_config.yaml`` as ``make serve`` does (``KEY=VALUE`` pairs are added to its environment),
asks for a multimodal analysis until one is answered, then waits until every replica serves (``/readyz``
200), reads from ``serve run``'s log when each replica logged that it serves its model, measures what
each process had used (CPU seconds since it started, resident memory), prints a table and stops the cluster.
"""

import re
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

from benchmarks import cpu
from benchmarks.run import (
    CONFIG,
    DEFAULT_INGRESS,
    INGRESS_ENV,
    OUT,
    ROUTES,
    log,
    payloads,
    start,
    stop,
    wait_for_answer,
)

BASE = "http://127.0.0.1:8000"
# (ServeReplica:multimodal:VisionClassifier pid=26247) INFO 2026-12-07 03:35:52,189 ... -- Serving mobilenet_v2 ...
SERVING = re.compile(r"ServeReplica:[^:]+:(\w+) pid=(\d+)\).*? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*? -- Serving ")
ROUTES_KNOWN = re.compile(r"ProxyActor pid=\d+\).*? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Got updated endpoints")


def _when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(extra_env: dict[str, str]) -> dict:
    from benchmarks.run import BIN

    began = time.time()
    process = start(
        [str(BIN / "serve"), "run", str(CONFIG)], env={**INGRESS_ENV[DEFAULT_INGRESS], **extra_env}, log_name="start"
    )
    try:
        first = wait_for_answer(BASE, ROUTES["multimodal"], payloads()["multimodal"], process)
        log(f"first multimodal answer {first:.1f} s after serve run")
        deadline = time.monotonic() + 600
        while httpx.get(f"{BASE}/readyz", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("not every model became ready within 600 s")
            time.sleep(0.5)
        ready = time.time() - began
        samples = cpu.snapshot()
        memory = {pid: _rss_mib(pid) for pid, sample in samples.items() if sample.role.startswith("replica: ")}
    finally:
        stop(process)
    text = (OUT / "start.log").read_text(errors="replace")
    serving: dict[str, list[float]] = {}
    for name, _pid, stamp in SERVING.findall(text):
        serving.setdefault(name, []).append(_when(stamp) - began)
    routes = [_when(stamp) - began for stamp in ROUTES_KNOWN.findall(text)]
    roles: dict[str, dict] = {}
    for pid, sample in samples.items():
        entry = roles.setdefault(sample.role, {"cpu_s": 0.0, "rss_mib": 0.0, "processes": 0})
        entry["cpu_s"] += sample.cpu_s
        entry["rss_mib"] += memory.get(pid, 0.0)
        entry["processes"] += 1
    return {"first_answer_s": first, "all_ready_s": ready, "serving": serving, "routes_s": routes, "roles": roles}


def main() -> None:
    extra = dict(pair.split("=", 1) for pair in sys.argv[1:])
    log(f"cold start, {CONFIG.name}, extra environment {extra or 'none'}")
    result = measure(extra)
    print(
        f"first multimodal answer: {result['first_answer_s']:.1f} s; every model ready: {result['all_ready_s']:.1f} s"
    )
    if result["routes_s"]:
        print(f"HTTP routes known to the proxy: {min(result['routes_s']):.1f} s")
    print("| deployment | began serving, s after serve run | CPU s by then, all replicas | resident MiB |")
    print("|---|---|---|---|")
    for role, entry in sorted(result["roles"].items(), key=lambda item: -item[1]["cpu_s"]):
        name = role.removeprefix("replica: ")
        times = ", ".join(f"{t:.1f}" for t in sorted(result["serving"].get(name, [])))
        memory = f"{entry['rss_mib']:.0f}" if entry["rss_mib"] else ""
        print(f"| {role} ({entry['processes']}) | {times} | {entry['cpu_s']:.1f} | {memory} |")


if __name__ == "__main__":
    main()
