"""What shadow traffic costs the stable variant: the vision route's throughput and p99 with a candidate vision model
in shadow mode, against the same running cluster with its rollout off, one after the other.

The candidate is the shipped model under another version (``pipelines.candidates:vision``, one replica), so every
copy is as much work as the answer it shadows; on two cores the copies compete with the answers for the CPU.
``BENCH_SETUPS=shadow make bench`` measures only this, into the last report.
"""

import os
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.loadgen import run_load
from pipelines.candidates import with_candidate

CANDIDATE = "vision-candidate"
CLIENTS = (8, 32)
SETTINGS = (("off", 100.0), ("shadow", 100.0), ("shadow", 10.0))  # (mode, percent of requests copied)
ROUTE = "/v1/vision/classify"
READY_TIMEOUT_S = 300


def shadow_candidate(config: dict, mode: str, percent: float = 100.0) -> dict:
    """``config`` with a candidate vision application beside the app and the ingress's rollout in ``mode``
    (shadow: copying ``percent`` of requests)."""
    rollout = {"mode": mode, "shadow_percent": percent, "policy": {"auto": False}}
    return with_candidate(config, "vision", rollout, CANDIDATE, version="shadow-candidate")


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
    for mode, percent in SETTINGS:
        setting = "off" if mode == "off" else f"shadow {percent:g}%"
        path = folder / f"shadow-{mode}-{percent:g}.yaml"
        path.write_text(yaml.safe_dump(shadow_candidate(config, mode, percent)))
        _deploy(serve, path, base, mode)
        before = _rollout(base)["variants"]
        for clients in CLIENTS:
            row = {"mode": setting, **run_load(base + ROUTE, payload, clients, duration_s)}
            log(f"{setting} c={clients}: {row['throughput_rps']:.1f} rps, p50 {row['p50_ms']:.0f} ms, "
                f"p99 {row['p99_ms']:.0f} ms, errors {row['error_rate']:.1%}")  # fmt: skip
            rows.append(row)
        time.sleep(3)  # the ingress replicas' last counts reach the judge
        after = _rollout(base)["variants"]
        if mode == "shadow":
            counted = {key: after["candidate"][key] - before["candidate"][key]
                       for key in ("compared", "shadow_dropped", "errors")}  # fmt: skip
            counted["answered"] = after["stable"]["requests"] - before["stable"]["requests"]
            counted["agreement"] = after["candidate"]["agreement"]
            copies[setting] = counted
            log(f"{setting}: {counted['answered']} answered, {counted['compared']} copies compared, "
                f"{counted['shadow_dropped']} dropped, {counted['errors']} failed")  # fmt: skip
    return {"duration_s": duration_s, "rows": rows, "copies": copies}


def report(shadow: dict) -> list[str]:
    """The Markdown section of docs/BENCHMARKS.md."""
    by = {(r["mode"], r["concurrency"]): r for r in shadow["rows"]}
    lines = [
        "## Shadow traffic",
        "",
        "The vision route with a candidate vision model in shadow mode (README: Rollouts), copying every request "
        "or one in ten, against the same running cluster with the rollout off, "
        f"{shadow['duration_s']:.0f} s per point. The candidate is the shipped model under another version on one "
        "replica: every copy is as much work as the answer it shadows, on the same two cores. At most 4 copies are "
        "in flight per ingress replica; the rest are dropped, not queued.",
        "",
        "| clients | copied | rps | of off | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for clients in sorted({c for _, c in by}):
        off = by.get(("off", clients))
        for setting in sorted({m for m, _ in by}, key=lambda m: (m != "off", m)):
            row = by.get((setting, clients))
            if row is None or off is None:
                continue
            copied = "none (off)" if setting == "off" else setting.removeprefix("shadow ")
            lines.append(
                f"| {clients} | {copied} | {row['throughput_rps']:.1f} | "
                f"{row['throughput_rps'] / off['throughput_rps']:.2f} | {row['p99_ms']:.0f} | {row['error_rate']:.1%} |"
            )
    for setting, counted in shadow["copies"].items():
        lines += [
            "",
            f"{setting}: of {counted['answered']} answers, {counted['compared']} copies were compared with the stable "
            f"answer (agreement {counted['agreement']}), {counted['shadow_dropped']} dropped because the budget was "
            f"full, {counted['errors']} failed.",
        ]
    return lines
