"""Updates under load drop nothing: live settings, new model versions, new fusion weights, a whole new app.

Each goes through ``serve deploy`` of an edited Serve YAML, as an operator
would do it, while clients keep sending vision, text and multimodal requests.
Every request must succeed, no deployment may be left without a running
replica at any moment, and the API must report the new settings afterwards.
"""

import threading
import time

import httpx
import numpy as np
import pytest
from ray import serve

from tests.conftest import b64
from tests.integration.conftest import deploy, shipped_config
from tests.serving import APP, replica_actors, replica_infos, serve_status

CLIENTS = 6
# Each client pauses this long between requests: requests of every route stay in flight during every step of an
# update, and the update keeps CPU to start replicas. Closed-loop clients with no pause saturated both cores, and
# each update waited on the load: behind HAProxy, which lets the load take more, replacing every replica took
# 167 s under three such clients, 132-143 s under six paced ones; the model rollouts 23-28 s instead of 13-19.
PAUSE_S = 0.2
UPDATE_TIMEOUT_S = 240
DEPLOYMENTS = ("VisionClassifier", "TextEncoder", "FusionScorer", "Ingress")
REPLACEMENT_ARGS = {"gpu_wait_s": 1}
DEPLOYED_ARGS: dict = {}  # args the app runs with that differ from the shipped ones


class SteadyLoad:
    """Closed-loop clients that record the status (and model version) of every response.

    Each client pauses ``PAUSE_S`` between requests. Meanwhile a watcher records the fewest RUNNING replicas each
    deployment had.
    """

    def __init__(self, url: str, image: bytes):
        self.url = url
        self.vision = {"image": b64(image), "top_k": 1}
        self.multimodal = {"image": b64(image), "text": "a cat on a sofa", "labels": ["cat", "car"]}
        self.text = {"text": "a cat on a sofa", "labels": ["animals", "vehicles"]}
        self.results: list[tuple[float, str, int, str | None, float]] = []  # (done, route, status, version, sent)
        self.multimodal_weights: list[dict] = []
        self.fewest_running = dict.fromkeys(DEPLOYMENTS, 1_000)
        self.observations = dict.fromkeys(DEPLOYMENTS, 0)
        self.watch_errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]
        self._threads.append(threading.Thread(target=self._watch))

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            n = index
            while not self._stop.is_set():
                n += 1
                start = time.monotonic()
                route, payload = [
                    ("/v1/vision/classify", self.vision),
                    ("/v1/multimodal/analyze", self.multimodal),
                    ("/v1/text/classify", self.text),
                ][n % 3]
                response = client.post(route, json=payload)
                body = response.json() if response.status_code == 200 else {}
                if route == "/v1/multimodal/analyze" and body:
                    self.multimodal_weights.append(body["weights"])
                self.results.append((time.monotonic(), route, response.status_code, body.get("version"), start))
                self._stop.wait(PAUSE_S)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                deployments = serve_status().applications[APP].deployments
            except Exception as exc:  # noqa: BLE001 - an unreadable status fails the test, below
                self.watch_errors.append(repr(exc))
                deployments = {}
            for name in DEPLOYMENTS:
                if name in deployments:  # absent while Serve builds a new version of the app
                    running = deployments[name].replica_states.get("RUNNING", 0)
                    self.fewest_running[name] = min(self.fewest_running[name], running)
                    self.observations[name] += 1
            time.sleep(0.2)

    def __enter__(self) -> "SteadyLoad":
        for thread in self._threads:
            thread.start()
        time.sleep(3)  # steady state before the update
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(3)  # and after it
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for_answers_sent_after(self, moment: float, route: str, count: int = 5, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for _, r, _, _, sent in self.results if r == route and sent > moment) >= count:
                return
            time.sleep(0.2)

    def failures(self) -> list[tuple]:
        return [r for r in self.results if r[2] != 200]

    def versions(self, route: str) -> list[str]:
        return [version for _, r, status, version, _ in self.results if r == route and version]

    def assert_nothing_failed(self) -> None:
        failures = self.failures()
        assert self.results and not failures, f"{len(failures)} of {len(self.results)} failed: {failures[:5]}"
        assert not self.watch_errors, self.watch_errors[:3]
        assert min(self.observations.values()) >= 10, f"the replicas were hardly watched: {self.observations}"
        emptied = {name: n for name, n in self.fewest_running.items() if n < 1}
        assert not emptied, f"deployments left without a running replica during the update: {emptied}"


def deployment(config: dict, name: str) -> dict:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def running_replicas(name: str) -> int:
    return serve_status().applications[APP].deployments[name].replica_states.get("RUNNING", 0)


def wait_for_version(name: str, version: str, replicas: int) -> float:
    """Until all ``replicas`` replicas of ``name`` run and report ``version``; the moment that was seen."""
    deadline = time.monotonic() + UPDATE_TIMEOUT_S
    while time.monotonic() < deadline:
        if running_replicas(name) == replicas:
            if {i["version"] for i in replica_infos(name, replicas).values()} == {version}:
                return time.monotonic()
        time.sleep(0.5)
    pytest.fail(f"{name} replicas did not all reach version {version}")


def roll_out_model_version(app_url: str, image: bytes, folder, name: str, version: str) -> SteadyLoad:
    """Deploy ``version`` of deployment ``name``'s model under steady load; the load, checked for failures."""
    config = shipped_config()
    deployment(config, name)["user_config"]["model"]["version"] = version
    replicas = deployment(config, name)["autoscaling_config"]["min_replicas"]
    route = {"VisionClassifier": "/v1/vision/classify", "TextEncoder": "/v1/text/classify"}[name]
    with SteadyLoad(app_url, image) as load:
        deploy(config, folder / f"{name}-{version}.yaml")
        load.updated_at = wait_for_version(name, version, replicas)
        load.wait_for_answers_sent_after(load.updated_at, route)
    load.assert_nothing_failed()
    return load


@pytest.fixture(scope="module")
def folder(app_url, tmp_path_factory):
    path = tmp_path_factory.mktemp("updates")
    yield path
    # Back to the shipped settings for later modules, but for args the replacement test changed:
    # gpu_wait_s does nothing without require_gpus, and restoring it would replace every replica again.
    config = shipped_config()
    config["applications"][0]["args"] |= DEPLOYED_ARGS
    deploy(config, path / "shipped.yaml")


def test_live_user_config_change_under_load_fails_no_request(folder, app_url, chelsea_jpeg):
    config = shipped_config()
    batching = deployment(config, "VisionClassifier")["user_config"]
    batching["max_batch_size"] = changed = 2 if batching["max_batch_size"] != 2 else 3  # a change, whatever ships
    with SteadyLoad(app_url, chelsea_jpeg) as load:
        deploy(config, folder / "batch.yaml")
    load.assert_nothing_failed()
    replicas = replica_infos("VisionClassifier", running_replicas("VisionClassifier"))
    assert {info["details"]["batching"]["max_batch_size"] for info in replicas.values()} == {changed}


def test_new_vision_model_rolls_out_under_load_and_fails_no_request(folder, app_url, chelsea_jpeg):
    new_version = "mobilenet_v2-2026.11"
    old_version = replica_infos("VisionClassifier", 1).popitem()[1]["version"]
    untouched = {name: replica_actors(name) for name in ("TextEncoder", "FusionScorer", "Ingress")}

    load = roll_out_model_version(app_url, chelsea_jpeg, folder, "VisionClassifier", new_version)
    versions_seen = load.versions("/v1/vision/classify")
    assert old_version in versions_seen and new_version in versions_seen
    # Every request sent once all replicas serve the new version is answered by it.
    late = [
        (round(sent - load.updated_at, 2), round(done - load.updated_at, 2), version)
        for done, route, _, version, sent in load.results
        if route == "/v1/vision/classify" and sent > load.updated_at
    ]
    assert late and {version for _, _, version in late} == {new_version}, late[-20:]
    assert {name: replica_actors(name) for name in untouched} == untouched  # only vision was touched

    after = {m["id"]: m for m in httpx.get(f"{app_url}/v1/models").json()["data"]}
    assert after["vision"]["version"] == new_version
    cat = httpx.post(f"{app_url}/v1/vision/classify", json={"image": b64(chelsea_jpeg), "top_k": 1}).json()
    assert cat["labels"][0]["label"] == "Egyptian cat" and cat["version"] == new_version


def test_new_text_model_rolls_out_under_load_and_fails_no_request(folder, app_url, chelsea_jpeg):
    new_version = "all-MiniLM-L6-v2-2026.11"
    load = roll_out_model_version(app_url, chelsea_jpeg, folder, "TextEncoder", new_version)
    versions_seen = load.versions("/v1/text/classify")
    late = [v for _, route, _, v, sent in load.results if route == "/v1/text/classify" and sent > load.updated_at]
    assert versions_seen[0] != new_version and late and set(late) == {new_version}, late[-20:]
    multimodal = httpx.post(
        f"{app_url}/v1/multimodal/analyze",
        json={"image": b64(chelsea_jpeg), "labels": ["a photo of a cat", "a cup of coffee", "a rocket launch"]},
    ).json()
    assert multimodal["fused"][0]["label"] == "a photo of a cat"  # ConSE with the new text model's embeddings


def test_new_fusion_weights_apply_under_load_and_fail_no_request(folder, app_url, chelsea_jpeg):
    config = shipped_config()
    user_config = deployment(config, "FusionScorer")["user_config"]
    user_config["vision_weight"], user_config["text_weight"] = 0.8, 0.2
    with SteadyLoad(app_url, chelsea_jpeg) as load:
        deploy(config, folder / "new_weights.yaml")

    load.assert_nothing_failed()
    weights = load.multimodal_weights
    assert weights[0] == {"vision": 0.5, "text": 0.5}
    assert weights[-1] == pytest.approx({"vision": 0.8, "text": 0.2})


def test_replacing_every_replica_under_load_fails_no_request(folder, app_url, chelsea_jpeg):
    """A change to the app's args (or its code) replaces all four deployments' replicas, surge first."""
    before = {name: set(replica_actors(name)) for name in DEPLOYMENTS}
    config = shipped_config()
    config["applications"][0]["args"] |= REPLACEMENT_ARGS  # any args change gives every deployment a new version
    DEPLOYED_ARGS.update(REPLACEMENT_ARGS)
    with SteadyLoad(app_url, chelsea_jpeg) as load:
        deploy(config, folder / "new_args.yaml")

    load.assert_nothing_failed()
    for name, replicas in before.items():
        assert not replicas & set(replica_actors(name)), f"{name} was not replaced"


def test_vision_replica_redoes_preprocessing_prepared_for_another_geometry(app_url):
    """What a caller holding a previous model's geometry sends during an update is still classified."""
    vision = serve.get_deployment_handle("VisionClassifier", app_name=APP)
    result = vision.classify.remote(np.full((300, 260, 3), 128, dtype=np.uint8), 1).result()
    assert len(result.labels) == 1
