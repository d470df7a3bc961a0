"""Rollouts on the running app: a candidate vision model in an application of its own, given a canary share or
shadow copies by the ingress's ``user_config``, and judged under load.

Each step is a ``serve deploy`` of the shipped YAML with the candidate application added and the ingress's
``rollouts`` set, as the README's walk-through does; only the ingress (in place) and the candidate change. The
module ends by deploying the shipped YAML again, which removes the candidate.
"""

import io
import json
import os
import signal
import threading
import time
import uuid
import wave
from collections import Counter

import httpx
import pytest
import tritonclient.http as triton
import yaml

from monitoring import catalog
from monitoring.metrics import ROLLOUT_METRICS
from pipelines.candidates import with_candidate
from tests import serving
from tests.conftest import b64
from tests.integration.conftest import deploy, shipped_config
from tests.integration.test_images_to_words import page_png

CANDIDATE = "vision-candidate"
READY_TIMEOUT_S = 180
JUDGE_TIMEOUT_S = 120
CLIENTS = 6
PAUSE_S = 0.1
# Judged fast enough for a test: a small window, and latency judged loosely (two cores shared with the load).
POLICY = {"steps": [10, 50, 100], "min_requests": 20, "interval_s": 1, "criteria": {"max_p95_latency_ratio": 5}}
BAD_MODEL = {"version": "bad-normalization", "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}}


def vision_candidate(rollout: dict, model: dict | None = None) -> dict:
    """The shipped config with a candidate vision application beside the app and the ingress's rollout set."""
    settings = {"version": "candidate-1", **(model or {})}
    config = with_candidate(shipped_config(), "vision", rollout, CANDIDATE, **settings)
    (candidate,) = config["applications"][-1]["deployments"]
    candidate["max_ongoing_requests"] = 16
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("rollouts")


@pytest.fixture(scope="module")
def rolled(app_url, folder):
    """Deploys a rollout and waits until the ingress reports it with a ready candidate; restores the shipped app."""

    def roll(rollout: dict, model: dict | None = None) -> dict:
        deploy(vision_candidate(rollout, model), folder / "serve_config.yaml")
        version = (model or {}).get("version", "candidate-1")

        def started(state: dict | None) -> bool:
            return bool(state and state["candidate_ready"] and state["candidate_version"] == version
                        and state["status"] == rollout["mode"] and not state["decisions"])  # fmt: skip

        return wait_for(app_url, started, READY_TIMEOUT_S, f"{rollout['mode']} rollout of a ready {version}")

    yield roll
    deploy(shipped_config(), folder / "serve_config.yaml")


def rollout_state(url: str, model: str = "vision") -> dict | None:
    answer = httpx.get(f"{url}/v1/admin/rollouts", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["rollouts"].get(model)


def wait_for(url: str, condition, timeout_s: float, what: str, model: str = "vision") -> dict:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = rollout_state(url, model)
        if condition(state):
            return state
        time.sleep(0.5)
    pytest.fail(f"no {what} after {timeout_s} s; the rollout: {state}")


def variant_of(response: httpx.Response, model: str = "vision") -> str:
    return dict(pair.split("=") for pair in response.headers["x-maas-variant"].split(","))[model]


def classify(client: httpx.Client, image: bytes, **headers) -> httpx.Response:
    return client.post("/v1/vision/classify", json={"image": b64(image), "top_k": 5}, headers=headers)


class Load:
    """Clients classifying one photo, each request as a new caller, recording every status and variant."""

    def __init__(self, url: str, image: bytes):
        self.url, self.payload = url, {"image": b64(image), "top_k": 5}
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                response = client.post("/v1/vision/classify", json=self.payload,
                                       headers={"X-Maas-Caller": uuid.uuid4().hex})  # fmt: skip
                variant = variant_of(response) if response.status_code == 200 else None
                self.results.append((response.status_code, variant))
                self._stop.wait(PAUSE_S)

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def test_a_canary_splits_by_its_weight_sticky_per_caller_and_a_pin_overrides(rolled, client, chelsea_jpeg):
    rolled({"mode": "canary", "weight": 20, "policy": {"auto": False}})
    stable_answer = classify(client, chelsea_jpeg, **{"X-Maas-Variant": "stable"})
    assert variant_of(stable_answer) == "stable" and stable_answer.json()["version"] != "candidate-1"
    pinned = classify(client, chelsea_jpeg, **{"X-Maas-Variant": "candidate"})
    assert variant_of(pinned) == "candidate" and pinned.json()["version"] == "candidate-1"
    assert pinned.json()["labels"][0]["label"] == stable_answer.json()["labels"][0]["label"] == "Egyptian cat"

    answered: dict[str, str] = {}
    lock = threading.Lock()

    def caller(index: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            for n in range(index, 400, 8):
                response = classify(own, chelsea_jpeg, **{"X-Maas-Caller": f"caller-{n}"})
                assert response.status_code == 200, response.text
                with lock:
                    answered[f"caller-{n}"] = variant_of(response)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shares = Counter(answered.values())
    assert len(answered) == 400 and 56 <= shares["candidate"] <= 104, shares  # 20% +- 6 points
    for name in [c for c, v in answered.items() if v == "candidate"][:5] + [c for c, v in answered.items()
                                                                           if v == "stable"][:5]:  # fmt: skip
        again = {variant_of(classify(client, chelsea_jpeg, **{"X-Maas-Caller": name})) for _ in range(4)}
        assert again == {answered[name]}, name

    # The multimodal route's vision branch stays on the stable variant: fusion knows only its class names.
    analyzed = client.post("/v1/multimodal/analyze", headers={"X-Maas-Variant": "candidate"},
                           json={"image": b64(chelsea_jpeg), "text": "a cat", "labels": ["cat", "car"]})  # fmt: skip
    assert analyzed.status_code == 200 and analyzed.json()["fused"][0]["label"] == "cat", analyzed.text

    refused = classify(client, chelsea_jpeg, **{"X-Maas-Variant": "blue"})
    assert refused.status_code == 422 and "X-Maas-Variant" in refused.text


def test_shadow_copies_are_compared_never_answer_and_are_dropped_when_the_candidate_is_busy(
    rolled, client, chelsea_jpeg, coffee_jpeg
):
    before = rolled({"mode": "shadow", "shadow_in_flight": 1, "policy": {"auto": False}})
    reference = {image: classify(client, image, **{"X-Maas-Variant": "stable"}).content
                 for image in (chelsea_jpeg, coffee_jpeg)}  # fmt: skip
    sent = 0
    for index in range(20):
        image = (chelsea_jpeg, coffee_jpeg)[index % 2]
        answer = classify(client, image)
        sent += 1
        assert answer.status_code == 200 and variant_of(answer) == "stable"
        assert answer.content == reference[image]  # byte for byte the stable variant's answer
        time.sleep(0.1)

    def burst(_) -> httpx.Response:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            return classify(own, chelsea_jpeg)

    threads_answers = []
    threads = [threading.Thread(target=lambda: threads_answers.append(burst(None))) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent += len(threads)
    assert all(a.status_code == 200 and a.content == reference[chelsea_jpeg] for a in threads_answers)

    def accounted(state: dict) -> bool:  # every copy compared, failed or dropped, and counted at the judge
        candidate, stable = state["variants"]["candidate"], state["variants"]["stable"]
        prior = before["variants"]
        copies = candidate["compared"] + candidate["errors"] + candidate["shadow_dropped"]
        previous = prior["candidate"]["compared"] + prior["candidate"]["errors"] + prior["candidate"]["shadow_dropped"]
        return stable["requests"] - prior["stable"]["requests"] >= sent and copies - previous >= sent

    state = wait_for(str(client.base_url), accounted, 30, "account of every shadow copy")
    candidate = state["variants"]["candidate"]
    assert candidate["compared"] >= 10 and candidate["agreement"] == 1.0 and candidate["similarity"] > 0.999
    assert candidate["shadow_dropped"] >= 1  # 24 at once against a budget of one copy in flight


def test_the_judge_promotes_an_equal_candidate_under_load_and_fails_no_request(
    rolled, app_url, chelsea_jpeg, prometheus
):
    rolled({"mode": "canary", "weight": 10, "policy": POLICY})
    with Load(app_url, chelsea_jpeg) as load:
        state = wait_for(app_url, lambda r: r["status"] != "canary", JUDGE_TIMEOUT_S, "decision beyond the canary")
        time.sleep(2)
    assert state["status"] == "promoted", state["decisions"]
    assert [d["to_weight"] for d in state["decisions"]] == [50, 100, 100]
    statuses = Counter(status for status, _ in load.results)
    assert statuses == {200: len(load.results)}, statuses
    assert load.results[-1][1] == "candidate"  # promoted: the candidate answers everything


def test_the_judge_rolls_back_a_bad_candidate_under_load_and_fails_no_request(rolled, app_url, chelsea_jpeg):
    rolled({"mode": "canary", "weight": 10, "policy": POLICY}, model=BAD_MODEL)
    with Load(app_url, chelsea_jpeg) as load:
        state = wait_for(app_url, lambda r: r["status"] != "canary", JUDGE_TIMEOUT_S, "decision on the bad candidate")
        decided = len(load.results)
        time.sleep(3)  # routing follows the judge within about a second
    assert state["status"] == "rolled_back", state["decisions"]
    (decision,) = state["decisions"]
    assert decision["to_weight"] == 0 and any(r.startswith("max_confidence_psi") for r in decision["reasons"])
    statuses = Counter(status for status, _ in load.results)
    assert statuses == {200: len(load.results)}, statuses
    assert "candidate" not in {variant for _, variant in load.results[decided + 4 * CLIENTS :]}


def test_prometheus_scrapes_every_rollout_metric_and_the_rollback_alert_fires(prometheus):
    """The dashboard's Rollouts row and the rollback alert read what a real Prometheus scraped from the steps
    above (test_monitoring.py leaves these out: they exist only once a model has had a rollout)."""
    referenced = {name for name in catalog.referenced_metrics() if name.startswith(ROLLOUT_METRICS)}
    deadline = time.monotonic() + 30
    while missing := referenced - prometheus.metric_names():
        assert time.monotonic() < deadline, f"referenced by monitoring/ but not scraped: {sorted(missing)}"
        time.sleep(1)
    alert = 'count(ALERTS{alertname="MaasRolloutRolledBack", model="vision", decision="rolled_back"})'
    assert prometheus.wait_for(alert, lambda firing: firing >= 1) >= 1
    assert prometheus.query('sum(ray_maas_rollout_decisions_total{model="vision", decision="promoted"})') >= 1
    assert prometheus.query('sum(ray_maas_shadow_comparisons_total{model="vision", answer="same"})') >= 10
    share = 'sum(ray_maas_variant_requests_total{model="vision", variant="candidate", outcome="ok"})'
    assert prometheus.query(share) >= 80  # the canary's share of 400 requests, and every step since


def test_a_replaced_judge_goes_on_where_the_last_one_stood(app_url, client, chelsea_jpeg):
    """The judge saves its state in the GCS: killed, the replica Serve starts in its place keeps the rolled-back
    candidate at 0% (a judge starting afresh would give it its YAML weight again)."""
    before = rollout_state(app_url)
    assert before["status"] == "rolled_back"
    (pid,) = serving.replica_actors("RolloutJudge").values()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, "no judge replica answered after the last one was killed"
        time.sleep(1)
        if pid in serving.replica_actors("RolloutJudge").values():
            continue
        answer = httpx.get(f"{app_url}/v1/admin/rollouts", timeout=30)
        if answer.status_code == 200 and "vision" in answer.json()["rollouts"]:
            break
        assert answer.status_code in (200, 503), answer.text  # 503 while no judge answers
    after = answer.json()["rollouts"]["vision"]
    assert (after["status"], after["weight"], after["decisions"]) == ("rolled_back", 0.0, before["decisions"])
    callers = [classify(client, chelsea_jpeg, **{"X-Maas-Caller": uuid.uuid4().hex}) for _ in range(20)]
    assert {variant_of(answer) for answer in callers} == {"stable"}


SENTENCES = ["The central bank raised interest rates.", "A cat sleeps on the sofa.", "The match ended in a draw."]
CHATS = ["Name a colour.", "What is two plus two?", "Say hello."]


def test_text_language_ocr_and_speech_candidates_are_compared_in_shadow_and_a_pin_reaches_them(
    rolled, client, folder, librivox
):
    """Candidates of the text encoder, the language model, the text reader and the speech recogniser, each the
    same weights as the stable one: every shadow copy agrees (embeddings at a cosine of 1, the same greedy text,
    the same lines read, the same words heard), and the candidates answer a pinned request, streamed for the
    language model."""
    config = shipped_config()
    for model in ("text", "llm", "ocr", "asr"):
        config = with_candidate(config, model, {"mode": "shadow", "shadow_in_flight": 16, "policy": {"auto": False}})
    # Speech has no shadow (no measure of agreement between two voices): a canary, reached here by a pin only.
    config = with_candidate(config, "tts", {"mode": "canary", "weight": 0, "policy": {"auto": False}})
    deploy(config, folder / "serve_config.yaml")
    for model in ("text", "llm", "ocr", "asr", "tts"):
        mode = "canary" if model == "tts" else "shadow"

        def started(state: dict | None, mode: str = mode) -> bool:
            return bool(state and state["candidate_ready"] and state["status"] == mode)

        wait_for(str(client.base_url), started, READY_TIMEOUT_S, f"ready {mode} candidate", model)

    def embed(text: str, **headers) -> httpx.Response:
        return client.post("/v1/text/embed", json={"texts": [text]}, headers=headers)

    def chat(content: str, stream: bool = False, **headers) -> httpx.Response:
        body = {"model": "llm", "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 12, "stream": stream}  # fmt: skip
        return client.post("/v1/chat/completions", json=body, headers=headers)

    for sentence in SENTENCES * 2:
        answer, pinned = embed(sentence), embed(sentence, **{"X-Maas-Variant": "stable"})
        assert answer.status_code == 200 and variant_of(answer, "text") == "stable"
        assert answer.json()["embeddings"] == pinned.json()["embeddings"]  # the stable variant's answer
    labels = {"text": SENTENCES[0], "labels": ["finance", "sports", "cooking"]}
    ranked = client.post("/v1/text/classify", json=labels)
    assert ranked.status_code == 200 and ranked.json()["labels"][0]["label"] == "finance"
    said = {}
    for content in CHATS:
        answer = chat(content)
        assert answer.status_code == 200 and variant_of(answer, "llm") == "stable", answer.text
        said[content] = answer.json()["choices"][0]["message"]["content"]

    page = client.post("/v1/vision/ocr", json={"image": b64(page_png())})
    assert page.status_code == 200 and variant_of(page, "ocr") == "stable" and len(page.json()["lines"]) >= 4
    heard = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", librivox[0].wav)},
                        data={"model": "asr", "language": "en"})  # fmt: skip
    assert heard.status_code == 200 and variant_of(heard, "asr") == "stable", heard.text
    speech = {"model": "tts", "voice": "joe", "input": "The candidate speaks.", "response_format": "wav"}
    for pin in ("stable", "candidate"):
        spoken = client.post("/v1/audio/speech", json=speech, headers={"X-Maas-Variant": pin})
        assert spoken.status_code == 200 and variant_of(spoken, "tts") == pin, spoken.text
        with wave.open(io.BytesIO(spoken.content)) as reader:
            assert reader.getnframes() / reader.getframerate() > 0.5  # a second or so of speech
    for model in ("ocr", "asr"):
        state = wait_for(str(client.base_url), lambda state: state["variants"]["candidate"]["compared"] >= 1,
                         60, f"comparison of the {model} copy", model)  # fmt: skip
        assert state["variants"]["candidate"]["agreement"] == 1.0, (model, state["variants"])

    text = wait_for(str(client.base_url), lambda state: state["variants"]["candidate"]["compared"] >= 7,
                    30, "comparison of every text copy", "text")  # fmt: skip
    assert text["variants"]["candidate"]["agreement"] == 1.0 and text["variants"]["candidate"]["similarity"] > 0.999
    llm = wait_for(str(client.base_url), lambda state: state["variants"]["candidate"]["compared"] >= 3,
                   60, "comparison of every greedy chat's copy", "llm")  # fmt: skip
    assert llm["variants"]["candidate"]["agreement"] == 1.0, llm["variants"]
    assert llm["variants"]["candidate"]["errors"] == 0 and llm["variants"]["stable"]["requests"] >= 3

    pinned = chat(CHATS[0], stream=True, **{"X-Maas-Variant": "candidate"})
    assert pinned.status_code == 200 and variant_of(pinned, "llm") == "candidate"
    events = [json.loads(line[6:]) for line in pinned.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == said[CHATS[0]]
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards["text"]["rollout"]["version"] == cards["llm"]["rollout"]["version"] == "candidate"
    assert cards["llm"]["rollout"]["mode"] == "shadow" and cards["vision"]["rollout"] is None
    oip = triton.InferenceServerClient(url=str(client.base_url).removeprefix("http://"), network_timeout=60)
    metadata = oip.get_model_metadata("text")  # the Open Inference Protocol names the candidate too
    assert (
        metadata["versions"] == [cards["text"]["version"]]
        and metadata["parameters"]["rollout"]["version"] == "candidate"
    )


def test_a_bad_rollout_update_is_refused_naming_the_field_and_the_running_one_stays(rolled, client, folder):
    """After the candidates above: an update with an out-of-range weight, then one naming an application Serve
    does not have. Each is refused by every ingress replica with the field named; the rollouts in force stay."""
    running = httpx.get(f"{client.base_url}/v1/admin/rollouts", timeout=30).json()["rollouts"]
    assert sorted(running) == ["asr", "llm", "ocr", "text", "tts"]
    config = None
    for rollout, error in (({"candidate": "text-candidate", "mode": "canary", "weight": 120}, "rollouts.text.weight"),
                           ({"candidate": "no-such-app", "mode": "shadow"}, "rollouts.text.candidate: no Serve "
                            "application named 'no-such-app'")):  # fmt: skip
        config = yaml.safe_load((folder / "serve_config.yaml").read_text()) if config is None else config
        ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
        ingress["user_config"]["rollouts"] = {**ingress["user_config"]["rollouts"], "text": rollout}
        deploy(config, folder / "bad.yaml")
        deadline = time.monotonic() + 60
        while True:  # every ingress replica refuses it (requests reach either)
            answers = [httpx.get(f"{client.base_url}/v1/admin/rollouts", timeout=30).json() for _ in range(6)]
            if all(error in (answer["update_error"] or "") for answer in answers):
                break
            assert time.monotonic() < deadline, f"the update was not refused with {error!r}: {answers[-1]}"
            time.sleep(1)
        assert all(answer["rollouts"].keys() == running.keys() for answer in answers)
        assert answers[-1]["rollouts"]["text"]["status"] == "shadow"  # the rollout in force stays
        assert variant_of(client.post("/v1/text/embed", json={"texts": ["still served"]}), "text") == "stable"
