"""``make bench``: throughput and latency of five setups, side by side on one machine.

1. raw: the models in this process at their best batch size, no HTTP (the machine's limit);
2. baseline: one FastAPI process calling the models once per request (benchmarks/baseline_server.py);
3. cluster, batching off: the Serve app with every ``max_batch_size`` set to 1;
4. cluster, batching on: the Serve app as shipped in serve_config.yaml, behind HAProxy as ``make serve`` runs
   it (deployments/haproxy.py);
5. cluster, Serve's Python proxy: the same app as ``make serve INGRESS=proxy`` runs it.

Each HTTP setup is loaded on the vision and multimodal routes at several
concurrencies with a closed-loop client. Also measured: cold start, the time
from ``serve run serve_config.yaml`` to the first multimodal answer; and the
language model (``benchmarks/llm.py``): streaming clients against the cluster
and the same model in-process, one request at a time; grounded descriptions
(``benchmarks/describe.py``): vision and OCR in parallel, then the language model; and speech
(``benchmarks/speech.py``): Whisper's word error rate on real speech, transcription throughput and time to first
text, and synthesis, through the cluster and in-process.

Writes ``docs/benchmarks/results.json``, ``docs/benchmarks/throughput.png``
and ``docs/BENCHMARKS.md``. Environment knobs: ``BENCH_DURATION_S`` (per
point, default 8), ``BENCH_CONCURRENCY`` (default ``1,8,32,64``), ``BENCH_CONFIG`` (the Serve
config to measure, default serve_config.yaml), the ``BENCH_LLM_*`` knobs of ``benchmarks/llm.py``, and
``BENCH_NICENESS`` (the
priority of every process of the run, default 0), ``BENCH_SETUPS=http``: the raw models, the baseline and the
cluster on the vision and multimodal routes, the other sections kept from the last report;
``BENCH_SETUPS=llm``: measure the language model alone and update its section of the last report;
``BENCH_SETUPS=describe`` likewise for descriptions (and the ``BENCH_DESCRIBE_*`` knobs of
``benchmarks/describe.py``); ``BENCH_SETUPS=faithfulness`` likewise for the explainers' deletion curves
(``benchmarks/faithfulness.py``, in-process); ``BENCH_SETUPS=structured`` likewise for structured outputs
and rerank (``benchmarks/structured.py``); ``BENCH_SETUPS=speech`` likewise for speech (and the
``BENCH_SPEECH_*`` knobs of ``benchmarks/speech.py``).
"""

import base64
import copy
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import skimage.data
import torch
import yaml
from PIL import Image

from benchmarks import describe, faithfulness, llm, shadow, speech, structured
from benchmarks.loadgen import run_load, run_overload
from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
BIN = Path(sys.executable).parent
CLUSTER_PORT = 8000
BASELINE_PORT = 8100
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "8"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,8,32,64").split(",")]
CONFIG = ROOT / os.environ.get("BENCH_CONFIG", "serve_config.yaml")
# The overload points: requests arriving at ten times the rate the vision route serves at saturation, and
# clients resending at once (open connections capped at OVERLOAD_CLIENTS in both).
OVERLOAD_FACTOR = float(os.environ.get("BENCH_OVERLOAD_FACTOR", "10"))
OVERLOAD_CLIENTS = int(os.environ.get("BENCH_OVERLOAD_CLIENTS", "320"))
# Every process of the run at one priority: this one (the load generator), the baseline server it starts, and
# Ray's workers (the HTTP proxy and every replica), which Ray otherwise starts at nice 15 (RAY_worker_niceness):
# on a machine shared with the load generator that starves the cluster and favours the baseline.
NICENESS = int(os.environ.get("BENCH_NICENESS", "0"))
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy:hardening"}
# As the Makefile sets them: INGRESS=haproxy (its default) and INGRESS=proxy.
INGRESS_ENV = {
    "haproxy": {
        **PROXY_ENV,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(BIN / "maas-haproxy"),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "10",
    },
    "proxy": PROXY_ENV,
}
DEFAULT_INGRESS = "haproxy"  # the Makefile's INGRESS default: the cluster's rows, cold start and overload
OTHER_INGRESS = "proxy"
ROUTES = {"vision": "/v1/vision/classify", "multimodal": "/v1/multimodal/analyze"}
LABELS = ["a photo of a cat", "a cup of coffee", "a rocket launch"]


def payloads() -> dict[str, dict]:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG", quality=90)
    image = base64.b64encode(buf.getvalue()).decode()
    return {
        "vision": {"image": image, "top_k": 5},
        "multimodal": {"image": image, "text": "my cat asleep on the sofa", "labels": LABELS},
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- 1. raw models --------------------------------------------------------


def measure_raw(requests: dict[str, dict]) -> dict:
    """Requests per second the machine's CPUs could answer with the models in-process (one single-threaded
    copy per CPU), decode to answer, by batch size, and the CPU milliseconds each request took (the models'
    own cost, with no serving around them)."""
    from deployments.contracts import FusionInput
    from deployments.fusion import FusionConfig, fuse
    from deployments.imaging import decode_base64, decode_image, prepare
    from deployments.settings import limits
    from deployments.text import TextConfig, TextModel
    from deployments.vision import VisionConfig, VisionModel

    # One thread, as each replica runs: two intra-op threads in one process are many times slower than one on
    # small VMs. The machine's limit is one such copy per CPU, each as fast as this one (an upper bound).
    torch.set_num_threads(1)
    cpus = os.cpu_count() or 1
    vision, text = VisionModel(VisionConfig()), TextModel(TextConfig())
    config = FusionConfig()
    class_embeddings = text.embed([config.class_prompt.format(n) for n in vision.categories])

    def pixels(payload: dict):
        return prepare(decode_image(decode_base64(payload["image"], limits()), limits()), vision.spec)

    def vision_batch(batch: int) -> None:
        vision.classify([pixels(requests["vision"]) for _ in range(batch)], top_k=5)

    def multimodal_batch(batch: int) -> None:
        payload = requests["multimodal"]
        images = vision.classify([pixels(payload) for _ in range(batch)], top_k=5)
        embeddings = text.embed([*payload["labels"], payload["text"]] * batch).reshape(batch, len(LABELS) + 1, -1)
        weights = {"vision": 0.5, "text": 0.5}
        fuse([FusionInput(i, e[:-1], e[-1], weights, class_embeddings) for i, e in zip(images, embeddings)], config)

    raw, cpu_ms = {}, {}
    for route, step in (("vision", vision_batch), ("multimodal", multimodal_batch)):
        raw[route], cpu_ms[route] = {}, {}
        for batch in (1, 2, 4, 8, 16):
            step(batch)  # warm-up
            done, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < max(2.0, DURATION_S / 3):
                step(batch)
                done += batch
            raw[route][batch] = cpus * done / (time.perf_counter() - start)
            cpu_ms[route][batch] = 1000.0 * (time.process_time() - cpu_start) / done
            log(f"raw {route} batch {batch}: {raw[route][batch]:.1f} req/s, {cpu_ms[route][batch]:.1f} ms of CPU each")
    return raw, cpu_ms


# --- servers ----------------------------------------------------------------


def start(command: list[str], env: dict | None = None, log_name: str = "server") -> subprocess.Popen:
    logfile = open(OUT / f"{log_name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """Stop a server this benchmark started (and, for `serve run`, the local Ray it started)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def wait_for_answer(base: str, route: str, payload: dict, process: subprocess.Popen, timeout_s: float = 600) -> float:
    """Seconds until ``route`` answers 200. One client for every attempt: a new one per attempt costs the
    machine being measured about 20 ms of CPU each time (its TLS context), four times a second."""
    start = time.monotonic()
    with httpx.Client(timeout=30) as client:
        while time.monotonic() - start < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; see {OUT}")
            try:
                if client.post(base + route, json=payload).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{base}{route} did not answer within {timeout_s}s")


def load_all(setup: str, base: str, requests: dict[str, dict]) -> list[dict]:
    rows = []
    for route, path in ROUTES.items():
        for concurrency in CONCURRENCY:
            row = {"setup": setup, "route": route, **run_load(base + path, requests[route], concurrency, DURATION_S)}
            log(
                f"{setup} {route} c={concurrency}: {row['throughput_rps']:.1f} rps, p50 {row['p50_ms']:.0f} ms, "
                f"p99 {row['p99_ms']:.0f} ms, refused {row['refused_rate']:.1%}, errors {row['error_rate']:.1%}"
            )
            rows.append(row)
    return rows


def run_baseline(requests: dict[str, dict], setup: str = "baseline", runtime: str = "torch") -> list[dict]:
    """The single-process server on eager PyTorch (the user's hand-written baseline) or, with ``runtime="auto"``,
    on the runtimes the cluster ships."""
    command = [str(BIN / "uvicorn"), "benchmarks.baseline_server:app", "--port", str(BASELINE_PORT)]
    process = start([*command, "--log-level", "warning"], env={"BASELINE_RUNTIME": runtime}, log_name=setup)
    try:
        base = f"http://127.0.0.1:{BASELINE_PORT}"
        wait_for_answer(base, ROUTES["multimodal"], requests["multimodal"], process)
        return load_all(setup, base, requests)
    finally:
        stop(process)


def measure_overload(base: str, requests: dict[str, dict], rows: list[dict]) -> list[dict]:
    """The overload points on the vision route, against the saturation throughput measured in ``rows``."""
    saturation = max(r["throughput_rps"] for r in rows if r["route"] == "vision")
    points = []
    for rate in (OVERLOAD_FACTOR * saturation, None):
        point = run_overload(
            base + ROUTES["vision"], requests["vision"], base + "/healthz", OVERLOAD_CLIENTS, DURATION_S, rate
        )
        point["saturation_rps"] = saturation
        load = f"{rate:.0f} req/s arriving" if rate else f"{OVERLOAD_CLIENTS} clients resending at once"
        log(
            f"overload, {load} on vision: {point['served_rps']:.1f} rps served, {point['refused']} refused "
            f"({point['refused_at_proxy']} at the proxy), refusal p99 {point['refused_server_p99_ms']:.1f} ms at "
            f"the server and {point['refused_client_p99_ms']:.0f} ms at the client, /healthz "
            f"{point['healthz_answered']}/{point['healthz_probes']} answered, slowest {point['healthz_max_ms']:.0f} ms"
        )
        points.append(point)
    return points


def run_cluster(
    requests: dict[str, dict], only: str | None = None
) -> tuple[list[dict], float, dict, list[dict], list[dict], dict | None, dict | None]:
    """The cluster's rows (batching on and off), cold start, overload points, language-model rows,
    description rows, speech measures and structured-output measures; ``only`` measures part of it: "http"
    (the rows, cold start and overload), "models" (the language model, descriptions, speech and structured
    outputs), "llm", "describe", "speech" or "structured"."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = CLUSTER_PORT
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    (folder / "on.yaml").write_text(yaml.safe_dump(config))
    off = copy.deepcopy(config)
    for deployment in off["applications"][0]["deployments"]:
        if "max_batch_size" in deployment.get("user_config", {}):
            deployment["user_config"]["max_batch_size"] = 1
    (folder / "off.yaml").write_text(yaml.safe_dump(off))

    base = f"http://127.0.0.1:{CLUSTER_PORT}"
    started = time.monotonic()
    # As `make serve` runs it: behind its default ingress, with deployments.proxy's hardening and admission.
    process = start(
        [str(BIN / "serve"), "run", str(folder / "on.yaml")], env=INGRESS_ENV[DEFAULT_INGRESS], log_name="cluster"
    )
    try:
        cold_start_s = wait_for_answer(base, ROUTES["multimodal"], requests["multimodal"], process)
        log(f"cold start: first multimodal answer {cold_start_s:.1f} s after `serve run`")
        llm_rows = llm.measure_cluster(base, log) if only in (None, "llm", "models") else []
        describe_rows = describe.measure_cluster(base, log) if only in (None, "describe", "models") else []
        speech_cluster = speech.measure_cluster(base, log) if only in (None, "speech", "models") else None
        structured_cluster = structured.measure_cluster(base, log) if only in (None, "structured", "models") else None
        if only not in (None, "http"):
            return [], cold_start_s, [], llm_rows, describe_rows, speech_cluster, structured_cluster
        rows = load_all("cluster-batching", base, requests)
        overload = measure_overload(base, requests, rows)
        # Batching off, applied live through user_config (reconfigure), no restart.
        subprocess.run(
            [str(BIN / "serve"), "deploy", str(folder / "off.yaml")],
            cwd=ROOT,
            check=True,
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            capture_output=True,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            models = httpx.get(base + "/v1/models", timeout=30).json()["data"]
            if all(m["details"].get("batching", {}).get("max_batch_size", 1) == 1 for m in models):
                break
            time.sleep(1)
        rows += load_all("cluster-no-batching", base, requests)
        return rows, cold_start_s, overload, llm_rows, describe_rows, speech_cluster, structured_cluster
    finally:
        stop(process)
        log(f"cluster stopped ({time.monotonic() - started:.0f} s in all)")


def run_other_ingress(requests: dict[str, dict]) -> list[dict]:
    """The cluster's rows behind the other ingress: the same config, batching on, Serve's Python proxy in place of
    HAProxy (``make serve INGRESS=proxy``)."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = CLUSTER_PORT
    setup = f"cluster-{OTHER_INGRESS}"
    path = Path(tempfile.mkdtemp(prefix="bench-")) / f"{OTHER_INGRESS}.yaml"
    path.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{CLUSTER_PORT}"
    started = time.monotonic()
    process = start([str(BIN / "serve"), "run", str(path)], env=INGRESS_ENV[OTHER_INGRESS], log_name=setup)
    try:
        wait_for_answer(base, ROUTES["multimodal"], requests["multimodal"], process)
        return load_all(setup, base, requests)
    finally:
        stop(process)
        log(f"cluster behind INGRESS={OTHER_INGRESS} stopped ({time.monotonic() - started:.0f} s in all)")


def measure_shadow(requests: dict[str, dict]) -> dict:
    """The vision route with a candidate in shadow mode and without (``benchmarks.shadow``), on one cluster behind
    the default ingress."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = CLUSTER_PORT
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    (folder / "off.yaml").write_text(yaml.safe_dump(shadow.shadow_candidate(config, "off")))
    base = f"http://127.0.0.1:{CLUSTER_PORT}"
    started = time.monotonic()
    process = start([str(BIN / "serve"), "run", str(folder / "off.yaml")], env=INGRESS_ENV[DEFAULT_INGRESS],
                    log_name="cluster-shadow")  # fmt: skip
    try:
        wait_for_answer(base, ROUTES["vision"], requests["vision"], process)
        return shadow.measure_cluster(base, config, folder, BIN / "serve", requests["vision"], DURATION_S, log)
    finally:
        stop(process)
        log(f"cluster with a shadow candidate stopped ({time.monotonic() - started:.0f} s in all)")


def same_priority() -> dict:
    """Put this process (and so the baseline server and Ray, which inherit it) at ``NICENESS``, and tell Ray
    to leave its workers at the niceness they inherit; the per-process tables show what each ran at."""
    os.nice(NICENESS - os.nice(0))  # lowering it needs privileges; raising it does not
    os.environ["RAY_worker_niceness"] = "0"
    return {"every_process": os.nice(0)}


def measure_http(requests: dict[str, dict], niceness: dict) -> dict:
    """The raw models, the baseline and the cluster on the vision and multimodal routes (every process at
    ``niceness``, from ``same_priority``)."""
    raw, raw_cpu_ms = measure_raw(requests)  # its models are freed on return, before the servers start
    rows = run_baseline(requests) + run_baseline(requests, "baseline-shipped", runtime="auto")
    cluster_rows, cold_start_s, overload, *_ = run_cluster(requests, only="http")
    cluster_rows += run_other_ingress(requests)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "niceness": niceness,
        "ingress": DEFAULT_INGRESS,
        "duration_s_per_point": DURATION_S,
        "cold_start_s": cold_start_s,
        "overload": overload,
        "raw_rps_by_batch": raw,
        "raw_cpu_ms_by_batch": raw_cpu_ms,
        "results": rows + cluster_rows,
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    niceness = same_priority()
    requests = payloads()
    log(f"niceness {niceness['every_process']} for every process of the run")
    log(f"concurrency {CONCURRENCY}, {DURATION_S:.0f} s per point, config {CONFIG.name}")
    if os.environ.get("BENCH_SETUPS") == "cluster":  # a quick look at one config while tuning; no report
        run_cluster(requests)
        return
    if os.environ.get("BENCH_SETUPS") == "llm":  # the language model alone, into the last report
        results = json.loads((OUT / "results.json").read_text())
        results["llm"] = measure_llm(requests)
        write_results(results)
        return
    if os.environ.get("BENCH_SETUPS") == "describe":  # descriptions alone, into the last report
        results = json.loads((OUT / "results.json").read_text())
        results["describe"] = describe_results(run_cluster(requests, only="describe")[4])
        write_results(results)
        return
    if os.environ.get("BENCH_SETUPS") == "speech":  # speech alone, into the last report
        results = json.loads((OUT / "results.json").read_text())
        results["speech"] = measure_speech(requests)
        write_results(results)
        return
    if os.environ.get("BENCH_SETUPS") == "structured":  # structured outputs and rerank alone, into the last report
        results = json.loads((OUT / "results.json").read_text())
        results["structured"] = measure_structured(requests)
        write_results(results)
        return
    if os.environ.get("BENCH_SETUPS") == "faithfulness":  # the explainers alone, into the last report
        results = json.loads((OUT / "results.json").read_text())
        results["faithfulness"] = faithfulness.measure(log)
        write_results(results)
        return
    if os.environ.get("BENCH_SETUPS") == "shadow":  # shadow traffic's cost alone, into the last report
        results = json.loads((OUT / "results.json").read_text())
        results["shadow"] = measure_shadow(requests)
        write_results(results)
        return
    if os.environ.get("BENCH_SETUPS") == "http":  # the request path alone, the other sections kept
        results = json.loads((OUT / "results.json").read_text())
        results.update(measure_http(requests, niceness))
        write_results(results)
        return
    in_process = llm.measure_in_process()
    log(f"llm in-process: {in_process['tokens_per_s']:.1f} tokens/s, first token p50 {in_process['ttft_p50_s']:.2f} s")
    explained = faithfulness.measure(log)
    speech_in_process = speech.measure_in_process(log)
    structured_in_process = structured.measure_in_process(log)
    cluster_rows, _, _, llm_rows, describe_rows, speech_cluster, structured_cluster = run_cluster(
        requests, only="models"
    )
    results = {
        **measure_http(requests, niceness),
        "llm": llm_results(in_process, llm_rows),
        "describe": describe_results(describe_rows),
        "faithfulness": explained,
        "speech": speech.combine(speech_in_process, speech_cluster),
        "structured": structured.combine(structured_in_process, structured_cluster),
        "shadow": measure_shadow(requests),
    }
    write_results(results)


def describe_results(rows: list[dict]) -> dict:
    return {"duration_s": describe.DURATION_S, "cluster": rows}


def llm_results(in_process: dict, cluster_rows: list[dict]) -> dict:
    return {"max_tokens": llm.MAX_TOKENS, "duration_s": llm.DURATION_S, "in_process": in_process,
            "cluster": cluster_rows}  # fmt: skip


def measure_llm(requests: dict[str, dict]) -> dict:
    in_process = llm.measure_in_process()
    log(f"llm in-process: {in_process['tokens_per_s']:.1f} tokens/s, first token p50 {in_process['ttft_p50_s']:.2f} s")
    cluster_rows = run_cluster(requests, only="llm")[3]
    return llm_results(in_process, cluster_rows)


def measure_speech(requests: dict[str, dict]) -> dict:
    """Speech in this process (before the cluster starts, so nothing else competes for the CPUs), then
    through the cluster."""
    in_process = speech.measure_in_process(log)
    return speech.combine(in_process, run_cluster(requests, only="speech")[5])


def measure_structured(requests: dict[str, dict]) -> dict:
    """The grammar's costs and rerank in this process (before the cluster starts), then through the cluster."""
    in_process = structured.measure_in_process(log)
    return structured.combine(in_process, run_cluster(requests, only="structured")[6])


def write_results(results: dict) -> None:
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, OUT / "throughput.png", ROOT / "docs" / "BENCHMARKS.md")
    log(f"wrote {OUT / 'results.json'}, {OUT / 'throughput.png'} and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
