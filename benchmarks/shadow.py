"""What shadow traffic costs the stable variant: the vision route's throughput and p99 with a candidate vision model
in shadow mode, against the same running cluster with its rollout off, one after the other.

The candidate is the shipped model under another version (``pipelines.candidates:vision``, one replica), so every
copy is as much work as the answer it shadows; on two cores the copies compete with the answers for the CPU.
``BENCH_SETUPS=shadow make bench`` measures only this, into the last report.
"""

import copy
import os
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.loadgen import run_load

CANDIDATE = "vision-candidate"
CLIENTS = (8, 32)
ROUTE = "/v1/vision/classify"
READY_TIMEOUT_S = 300


def with_candidate(config: dict, mode: str) -> dict:
    """``config`` with a candidate vision application beside the app and the ingress's rollout in ``mode``."""
    config = copy.deepcopy(config)
    (app,) = [a for a in config["applications"] if a["name"] == "multimodal"]
    stable = next(d for d in app["deployments"] if d["name"] == "VisionClassifier")
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["rollouts"] = {"vision": {"candidate": CANDIDATE, "mode": mode, "policy": {"auto": False}}}
    model = {**stable["user_config"]["model"], "version": "shadow-candidate"}
    config["applications"].append({
        "name": CANDIDATE,
        "route_prefix": None,
        "import_path": "pipelines.candidates:vision",
        "deployments": [{
            "name": "VisionClassifier",
            "num_replicas": 1,
            "max_ongoing_requests": stable["max_ongoing_requests"],
            "ray_actor_options": stable["ray_actor_options"],
            "user_config": {**stable["user_config"], "model": model},
        }],
    })  # fmt: skip
    return config


def _rollout(base: str) -> dict | None:
    return httpx.get(base + "/v1/admin/rollouts", timeout=30).json()["rollouts"].get("vision")


def _deploy(serve: Path, path: Path, base: str, mode: str) -> None:
    subprocess.run([str(serve), "deploy", str(path)], check=True, capture_output=True,
                   env={**os.environ, "RAY_AUTH_MODE": "token"})  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = _rollout(base)
        if state and state["candidate_ready"] and state["mode"] == mode:
            return
        time.sleep(1)
    raise RuntimeError(f"the candidate's {mode} rollout did not start within {READY_TIMEOUT_S} s")


def measure_cluster(base: str, config: dict, folder: Path, serve: Path, payload: dict, duration_s: float, log) -> dict:
    """Vision at each of ``CLIENTS`` with the rollout off, then in shadow mode; the copies counted meanwhile."""
    rows, copies = [], {}
    for mode in ("off", "shadow"):
        path = folder / f"shadow-{mode}.yaml"
        path.write_text(yaml.safe_dump(with_candidate(config, mode)))
        _deploy(serve, path, base, mode)
        before = _rollout(base)["variants"]["candidate"]
        for clients in CLIENTS:
            row = {"mode": mode, **run_load(base + ROUTE, payload, clients, duration_s)}
            log(f"shadow {mode} c={clients}: {row['throughput_rps']:.1f} rps, p50 {row['p50_ms']:.0f} ms, "
                f"p99 {row['p99_ms']:.0f} ms, errors {row['error_rate']:.1%}")  # fmt: skip
            rows.append(row)
        time.sleep(3)  # the ingress replicas' last counts reach the judge
        after = _rollout(base)["variants"]["candidate"]
        if mode == "shadow":
            copies = {key: after[key] - before[key] for key in ("compared", "shadow_dropped", "errors")}
            copies["agreement"] = after["agreement"]
            log(f"shadow copies: {copies['compared']} compared, {copies['shadow_dropped']} dropped, "
                f"{copies['errors']} failed, agreement {copies['agreement']}")  # fmt: skip
    return {"duration_s": duration_s, "rows": rows, "copies": copies}


def report(shadow: dict) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    by = {(r["mode"], r["concurrency"]): r for r in shadow["rows"]}
    copies = shadow["copies"]
    lines = [
        "## Shadow traffic",
        "",
        "The vision route with a candidate vision model in shadow mode (README: Rollouts) against the same running "
        f"cluster with the rollout off, {shadow['duration_s']:.0f} s per point. The candidate is the shipped model "
        "under another version on one replica: every copy is as much work as the answer it shadows, on the same "
        "two cores. At most 4 copies are in flight per ingress replica; the rest are dropped, not queued.",
        "",
        "| clients | rps, off | rps, shadow | ratio | p99 ms, off | p99 ms, shadow | errors, shadow |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in sorted({c for _, c in by}):
        off, on = by.get(("off", clients)), by.get(("shadow", clients))
        if off and on:
            lines.append(
                f"| {clients} | {off['throughput_rps']:.1f} | {on['throughput_rps']:.1f} | "
                f"{on['throughput_rps'] / off['throughput_rps']:.2f} | {off['p99_ms']:.0f} | {on['p99_ms']:.0f} | "
                f"{on['error_rate']:.1%} |"
            )
    if copies:
        lines += [
            "",
            f"Copies while shadowing: {copies['compared']} compared with the stable answer (agreement "
            f"{copies['agreement']}), {copies['shadow_dropped']} dropped because the budget was full, "
            f"{copies['errors']} failed.",
        ]
    return lines
