"""Turn benchmark results into a plot and a Markdown report with the headline ratios."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETUPS = {
    "baseline": "single-process FastAPI",
    # The same server on the runtimes the cluster ships (ONNX Runtime on a CPU): what the runtime gains alone.
    "baseline-shipped": "single-process FastAPI, shipped runtimes",
    "cluster-no-batching": "cluster, batching off",
    "cluster-batching": "cluster, batching on",
    # The same config behind the ingress `make serve` does not run by default (results["ingress"] names the one
    # it does): Serve's Python proxy (INGRESS=proxy), or, in runs from before HAProxy became the default, HAProxy.
    "cluster-proxy": "cluster, Serve's Python proxy",
    "cluster-haproxy": "cluster, HAProxy ingress",
}
# The setups the headline rates against the targets: the shipped default, then the other ingress.
CLUSTERS = {
    "cluster-batching": "cluster",
    "cluster-proxy": "cluster (Serve's Python proxy)",
    "cluster-haproxy": "cluster (HAProxy ingress)",
}
INGRESS_NAMES = {"haproxy": "HAProxy", "proxy": "Serve's Python proxy"}
# Targets from the project's goals for a 2-core CPU machine.
TARGET_OF_LIMIT = 0.8
TARGET_OVER_BASELINE = 1.5
TARGET_OVERHEAD_MS = 10.0
TARGET_REFUSAL_SERVER_P99_MS = 100.0  # a 503 under overload, from request received to refusal sent
TARGET_REFUSAL_CLIENT_P99_MS = 1000.0  # the same, as the client waits for it


def _rows(results: dict, setup: str, route: str) -> list[dict]:
    return sorted(
        (r for r in results["results"] if r["setup"] == setup and r["route"] == route), key=lambda r: r["concurrency"]
    )


def _at(results: dict, setup: str, route: str, concurrency: int) -> dict | None:
    return next((r for r in _rows(results, setup, route) if r["concurrency"] == concurrency), None)


def _statuses(counts: dict) -> str:
    """Status counts as ``{-1: 3754}`` (-1: no answer), whether they come from a run or from results.json."""
    return str({int(status): count for status, count in counts.items()}) if counts else "none"


def _open_loop_overload(results: dict) -> dict | None:
    return next((p for p in results.get("overload") or () if p.get("rate_per_s")), None)


def headline(results: dict) -> dict:
    """The ratios the project tracks, computed from one run: those of the shipped cluster at the top level,
    and the same for each other cluster setup measured under ``by_setup``."""
    raw = results["raw_rps_by_batch"]
    limit = {route: max(by_batch.values()) for route, by_batch in raw.items()}
    out = {"raw_limit_rps": limit, "by_setup": {}}
    for setup in CLUSTERS:
        if any(r["setup"] == setup for r in results["results"]):
            out["by_setup"][setup] = _ratios(results, setup, limit)
    out.update(out["by_setup"].get("cluster-batching", {}))
    return out


def _ratios(results: dict, setup: str, limit: dict) -> dict:
    out = {}
    raw = results["raw_rps_by_batch"]
    for route in limit:
        cluster = _rows(results, setup, route)
        if not cluster:
            continue
        saturation = max(r["throughput_rps"] for r in cluster)
        out[f"{route}_cluster_over_limit"] = saturation / limit[route]
        c32 = _at(results, setup, route, 32)
        b32 = _at(results, "baseline", route, 32)
        if c32 and b32:
            out[f"{route}_cluster_over_baseline_c32"] = c32["throughput_rps"] / b32["throughput_rps"]
            out[f"{route}_p99_ms_c32"] = {"cluster": c32["p99_ms"], "baseline": b32["p99_ms"]}
    c1 = _at(results, setup, "multimodal", 1)
    if c1:
        # One request's time in one single-threaded copy (the raw limit counts one copy per CPU).
        per_copy_rps = float(raw["multimodal"]["1"] if "1" in raw["multimodal"] else raw["multimodal"][1])
        compute_ms = 1000.0 * results["machine"]["cpus"] / per_copy_rps
        out["multimodal_overhead_p50_ms"] = c1["p50_ms"] - compute_ms
        out["multimodal_compute_ms_batch1"] = compute_ms
    return out


CPU_SETUPS = (
    "baseline",
    "baseline-shipped",
    "cluster-batching",
    "cluster-no-batching",
    "cluster-proxy",
    "cluster-haproxy",
)


def cpu_point(results: dict, route: str) -> int | None:
    """The concurrency whose CPU breakdown the report shows: 32 clients (the headline point), or the highest."""
    levels = {r["concurrency"] for r in results["results"] if r["route"] == route and r.get("cpu")}
    return 32 if 32 in levels else max(levels, default=None)


def cpu_total(row: dict | None) -> float | None:
    return sum(part["cpu_ms_per_request"] for part in row["cpu"].values()) if row and row.get("cpu") else None


def serving_cpu_ms(results: dict) -> float | None:
    """The cluster's CPU per vision request outside the models (at the CPU breakdown's point, batching on):
    what each request costs a node whatever accelerator runs the model."""
    concurrency = cpu_point(results, "vision")
    row = _at(results, "cluster-batching", "vision", concurrency) if concurrency else None
    by_batch = results.get("raw_cpu_ms_by_batch", {}).get("vision")
    if not row or not row.get("cpu") or not by_batch:
        return None
    return cpu_total(row) - float(by_batch.get("1", by_batch.get(1)))


def cpu_report(results: dict) -> list[str]:
    """Per-process CPU per answered request, for each setup at one concurrency, as measured from /proc."""
    if not any(r.get("cpu") for r in results["results"]):
        return []
    lines = [
        "## Where the CPU goes",
        "",
        "CPU time of every process on the machine while each point ran (user and system, from `/proc`), divided "
        "by the requests answered; niceness as each process ran. The raw models' own CPU per request (in-process, "
        "batch 1 and the best batch) is the part no serving layer can remove; the rest is what serving costs.",
    ]
    raw_cpu = results.get("raw_cpu_ms_by_batch", {})
    for route in ("vision", "multimodal"):
        concurrency = cpu_point(results, route)
        if concurrency is None:
            continue
        rows = {setup: _at(results, setup, route, concurrency) for setup in CPU_SETUPS}
        rows = {setup: row for setup, row in rows.items() if row and row.get("cpu")}
        roles = sorted(
            {role for row in rows.values() for role in row["cpu"]},
            key=lambda role: -max(row["cpu"].get(role, {}).get("cpu_ms_per_request", 0.0) for row in rows.values()),
        )
        lines += [
            "",
            f"**{route}, {concurrency} clients** (ms of CPU per answered request; processes, niceness)",
            "",
            "| process | " + " | ".join(SETUPS[setup] for setup in rows) + " |",
            "|---|" + "---|" * len(rows),
        ]
        for role in roles:
            cells = []
            for row in rows.values():
                part = row["cpu"].get(role)
                cells.append(
                    f"{part['cpu_ms_per_request']:.1f} ({part['processes']}, nice {'/'.join(map(str, part['nice']))})"
                    if part
                    else ""
                )
            lines.append(f"| {role} | " + " | ".join(cells) + " |")
        lines.append("| **total** | " + " | ".join(f"**{cpu_total(row):.1f}**" for row in rows.values()) + " |")
        if by_batch := raw_cpu.get(route):
            batch1 = float(by_batch.get("1", by_batch.get(1)))
            best = min(by_batch.values())
            lines.append(
                "| outside the models (total minus the raw models' batch-1 CPU) | "
                + " | ".join(f"{cpu_total(row) - batch1:.1f}" for row in rows.values())
                + " |"
            )
            lines += ["", f"The raw models: {batch1:.1f} ms of CPU per request at batch 1, {best:.1f} at the best."]
    return lines


def plot(results: dict, path: Path) -> None:
    routes = ["vision", "multimodal"]
    fig, axes = plt.subplots(len(routes), 2, figsize=(12, 8), constrained_layout=True)
    limit = headline(results)["raw_limit_rps"]
    for row, route in zip(axes, routes):
        for setup, label in SETUPS.items():
            rows = _rows(results, setup, route)
            if not rows:
                continue
            c = [r["concurrency"] for r in rows]
            (line,) = row[0].plot(c, [r["throughput_rps"] for r in rows], marker="o", label=label)
            color = line.get_color()
            row[1].plot(c, [r["p50_ms"] for r in rows], marker="o", color=color, label=f"{label} p50")
            row[1].plot(c, [r["p99_ms"] for r in rows], marker="x", ls="--", color=color, label=f"{label} p99")
        row[0].axhline(limit[route], color="grey", ls=":", label="raw model limit")
        row[0].set(title=f"{route}: throughput", xlabel="concurrent clients", ylabel="requests/s", xscale="log")
        row[1].set(title=f"{route}: latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
        row[0].legend(fontsize=8)
        row[1].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    if met:
        return "met"
    gap = (target - value) / target if higher_is_better else (value - target) / target
    return f"missed by {gap:.0%}"


def _headline_rows(h: dict, name: str) -> list[str]:
    """The headline's rows for one cluster setup (``name`` as the table calls it)."""
    lines = []
    for route in ("vision", "multimodal"):
        if f"{route}_cluster_over_limit" not in h:
            continue
        ratio = h[f"{route}_cluster_over_limit"]
        lines.append(
            f"| {route}: {name} throughput at saturation / raw model limit | {ratio:.2f} | "
            f">= {TARGET_OF_LIMIT} | {_verdict(ratio, TARGET_OF_LIMIT)} |"
        )
        if f"{route}_cluster_over_baseline_c32" in h:
            ratio = h[f"{route}_cluster_over_baseline_c32"]
            p99 = h[f"{route}_p99_ms_c32"]
            lines.append(
                f"| {route}: {name} / single-process baseline throughput, 32 clients | {ratio:.2f} | "
                f">= {TARGET_OVER_BASELINE} | {_verdict(ratio, TARGET_OVER_BASELINE)} |"
            )
            lines.append(
                f"| {route}: p99 latency at 32 clients, {name} vs baseline | {p99['cluster']:.0f} ms vs "
                f"{p99['baseline']:.0f} ms | cluster <= baseline | "
                f"{_verdict(p99['cluster'], p99['baseline'], higher_is_better=False)} |"
            )
    if "multimodal_overhead_p50_ms" in h:
        overhead = h["multimodal_overhead_p50_ms"]
        lines.append(
            f"| multimodal overhead at 1 client, {name}: p50 latency minus the models' own compute "
            f"({h['multimodal_compute_ms_batch1']:.0f} ms) | {overhead:.0f} ms | <= {TARGET_OVERHEAD_MS:.0f} ms | "
            f"{_verdict(overhead, TARGET_OVERHEAD_MS, higher_is_better=False)} |"
        )
    return lines


def _runtime_rows(results: dict) -> list[str]:
    """What the shipped runtimes gain on their own (the single-process server on them against eager PyTorch),
    and each cluster against that faster single process: what serving adds once the runtime is the same."""
    lines = []
    for route in ("vision", "multimodal"):
        eager, shipped = _at(results, "baseline", route, 32), _at(results, "baseline-shipped", route, 32)
        if not (eager and shipped):
            continue
        lines.append(
            f"| {route}: single-process server on the shipped runtimes / on eager PyTorch, 32 clients | "
            f"{shipped['throughput_rps'] / eager['throughput_rps']:.2f} | | |"
        )
        for setup, name in CLUSTERS.items():
            if cluster := _at(results, setup, route, 32):
                lines.append(
                    f"| {route}: {name} / single-process server on the same runtimes, 32 clients | "
                    f"{cluster['throughput_rps'] / shipped['throughput_rps']:.2f} | | |"
                )
    return lines


def markdown(results: dict, plot_name: str) -> str:
    h = headline(results)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (benchmarks/run.py) from one run on one machine: "
        f"{results['machine']['cpus']} CPUs, {results['machine']['platform']}, Python {results['machine']['python']}, "
        f"torch {results['machine']['torch']}. Each point is a closed loop of N clients sending back to back for "
        f"{results['duration_s_per_point']:.0f} s after a 2 s warm-up; the load generator runs on the same machine"
        + (
            f", and every process of the run (load generator, baseline server, Ray and its workers) at nice "
            f"{results['niceness']['every_process']}."
            if results.get("niceness")
            else "."
        ),
        "",
        # Runs from before the ingress was recorded ran behind Serve's Python proxy, then the default.
        f'The cluster rows ("cluster") ran behind {INGRESS_NAMES[results.get("ingress", "proxy")]}, as `make serve` '
        "starts it, and so did the cold start and the overload points; the other ingress's rows are named as such.",
        "",
        "## Headline",
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
    ]
    for setup, name in CLUSTERS.items():
        lines += _headline_rows(h["by_setup"].get(setup, {}), name)
    lines += _runtime_rows(results)
    for route in ("vision", "multimodal"):
        concurrency = cpu_point(results, route)
        baseline = cpu_total(_at(results, "baseline", route, concurrency)) if concurrency else None
        for setup, name in CLUSTERS.items():
            cluster = cpu_total(_at(results, setup, route, concurrency)) if concurrency else None
            if cluster and baseline:
                lines.append(
                    f"| {route}: CPU per answered request at {concurrency} clients, {name} vs baseline "
                    f"([breakdown](#where-the-cpu-goes)) | {cluster:.1f} ms vs {baseline:.1f} ms | | |"
                )
    if open_loop := _open_loop_overload(results):
        load = f"at {open_loop['rate_per_s'] / open_loop['saturation_rps']:.0f}x the vision route's saturation"
        for where, key, target in (
            ("server", "refused_server_p99_ms", TARGET_REFUSAL_SERVER_P99_MS),
            ("client", "refused_client_p99_ms", TARGET_REFUSAL_CLIENT_P99_MS),
        ):
            p99 = open_loop[key]
            lines.append(
                f"| refusals (503 + Retry-After) {load}: p99 at the {where} | {p99:.1f} ms | <= {target:.0f} ms | "
                f"{_verdict(p99, target, higher_is_better=False)} |"
            )
        answered, probes = open_loop["healthz_answered"], open_loop["healthz_probes"]
        lines.append(
            f"| /healthz probes answered {load} | {answered} of {probes} | all | {_verdict(answered, probes)} |"
        )
    lines += [
        f"| cold start: `serve run serve_config.yaml` to the first multimodal answer | "
        f"{results['cold_start_s']:.1f} s | | |",
        "",
        f"![throughput and latency]({plot_name})",
        "",
        "## Raw model limit (in-process, no HTTP, decode to answer)",
        "",
        "One thread measured in the benchmark's process, times the number of CPUs: one single-threaded copy of "
        "the models per CPU, each as fast as the one measured, the most this machine could answer.",
        "",
        "| route | " + " | ".join(f"batch {b}" for b in results["raw_rps_by_batch"]["vision"]) + " |",
        "|---|" + "---|" * len(results["raw_rps_by_batch"]["vision"]),
    ]
    for route, by_batch in results["raw_rps_by_batch"].items():
        lines.append(f"| {route} | " + " | ".join(f"{v:.1f} req/s" for v in by_batch.values()) + " |")
    if overload := results.get("overload"):
        lines += [
            "",
            "## Overload",
            "",
            "The vision route under overload, with a `/healthz` probe every 0.5 s from another process (a new "
            "connection each, 5 s timeout). No client honours `Retry-After`. *Open loop*: requests arrive at a "
            "fixed rate (Poisson) whatever the answers, on at most "
            f"{overload[0]['concurrency']} connections; an arrival with all of them busy is not sent (`-1`). "
            "*Closed loop*: that many clients, each sending again as soon as it has an answer, the harshest load: "
            "by Little's law each answer then waits about the number of clients divided by the answer rate. "
            "Refusal times at the server come from `Server-Timing` (the HTTP proxy's admission or the ingress's); "
            "at the client they include the wait for a CPU on a machine running everything at once, the load "
            "generator included (at the same niceness as the servers).",
            "",
            "| load | served | refused (at the proxy) | refusal p50 / p99 at the server | "
            "refusal p50 / p99 at the client | served p50 | /healthz answered, p50 / slowest | other statuses |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for point in overload:
            if point.get("rate_per_s"):
                factor = point["rate_per_s"] / point["saturation_rps"]
                load = f"open loop, {point['rate_per_s']:.0f} req/s ({factor:.0f}x saturation)"
            else:
                load = f"closed loop, {point['concurrency']} clients"
            lines.append(
                f"| {load} | {point['served_rps']:.1f} req/s | {point['refused']} ({point['refused_at_proxy']}) | "
                f"{point['refused_server_p50_ms']:.1f} / {point['refused_server_p99_ms']:.1f} ms | "
                f"{point['refused_client_p50_ms']:.0f} / {point['refused_client_p99_ms']:.0f} ms | "
                f"{point['served_p50_ms']:.0f} ms | {point['healthz_answered']} of {point['healthz_probes']}, "
                f"{point['healthz_p50_ms']:.0f} / {point['healthz_max_ms']:.0f} ms | "
                f"{_statuses(point['other_statuses'])} |"
            )
    lines += ["", *cpu_report(results)] if any(r.get("cpu") for r in results["results"]) else []
    lines += [
        "",
        "## All points",
        "",
        "| setup | route | clients | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | refused (503) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["results"]:
        lines.append(
            f"| {SETUPS.get(r['setup'], r['setup'])} | {r['route']} | {r['concurrency']} | {r['throughput_rps']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r.get('refused_rate', 0.0):.1%} | {r['error_rate']:.1%} |"
        )
    if results.get("llm"):
        from benchmarks.llm import report as llm_report

        lines += ["", *llm_report(results["llm"])]
    if results.get("describe"):
        from benchmarks.describe import report as describe_report

        lines += ["", *describe_report(results["describe"]["cluster"], results["describe"]["duration_s"])]
    if results.get("faithfulness"):
        from benchmarks.faithfulness import report as faithfulness_report

        lines += ["", *faithfulness_report(results["faithfulness"])]
    if results.get("speech"):
        from benchmarks.speech import report as speech_report

        lines += ["", *speech_report(results["speech"])]
    if results.get("structured"):
        from benchmarks.structured import report as structured_report

        lines += ["", *structured_report(results["structured"])]
    if results.get("shadow"):
        from benchmarks.shadow import report as shadow_report

        lines += ["", *shadow_report(results["shadow"])]
    gpu = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "gpu.json"
    if gpu.exists():
        from benchmarks.gpu import report as gpu_report

        lines += ["", *gpu_report(json.loads(gpu.read_text()), serving_cpu_ms(results))]
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def write_report(results: dict, plot_path: Path, report_path: Path) -> None:
    plot(results, plot_path)
    rel = plot_path.relative_to(report_path.parent)
    report_path.write_text(markdown(results, str(rel)))
