"""The GPU profile's benchmark (benchmarks/gpu.py) without a GPU: its report from the committed run, and a clear
refusal where there is no GPU to measure."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from benchmarks.report import serving_cpu_ms

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def measured() -> dict:
    return json.loads((ROOT / "docs" / "benchmarks" / "gpu.json").read_text())


def test_the_report_compares_four_replicas_with_one_and_says_what_the_cpus_can_feed(measured):
    text = "\n".join(gpu.report(measured, serving_cpu_ms=40.0))
    one, four = (measured["shared"]["4"][n]["images_per_s"] for n in ("1", "4"))
    assert f"| 4 | {one:.0f} | {four:.0f} | {four / one:.2f} |" in text
    decode_ms = measured["cpu_side"]["decode_and_prepare_cpu_ms"]
    assert f"that alone keeps {four * decode_ms / 1000:.1f} CPUs busy" in text
    assert f"answer at most {measured['machine']['cpus'] * 1000 / 40.0:.0f} requests/s" in text


def test_the_committed_benchmark_report_holds_this_gpu_section(measured):
    results = json.loads((ROOT / "docs" / "benchmarks" / "results.json").read_text())
    section = "\n".join(gpu.report(measured, serving_cpu_ms(results)))
    assert section in (ROOT / "docs" / "BENCHMARKS.md").read_text()


def test_without_a_gpu_it_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="bench-gpu needs a CUDA GPU that torch can see"):
        gpu.main()
