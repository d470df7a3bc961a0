"""Model updates under load drop nothing: a live user_config change, then a new model version.

Both go through ``serve deploy`` of an edited Serve YAML, as an operator would
do it, while clients keep sending vision and multimodal requests. Every
request must succeed, and the API must report the new version afterwards.
"""

import threading
import time

import httpx
import numpy as np
import pytest
from ray import serve

from tests.conftest import b64
from tests.integration.conftest import deploy, shipped_config
from tests.serving import APP, replica_infos

CLIENTS = 6
NEW_VERSION = "mobilenet_v2-2026.11"
UPDATE_TIMEOUT_S = 240


class SteadyLoad:
    """Closed-loop clients that record the status (and vision model version) of every response."""

    def __init__(self, url: str, image: bytes):
        self.url = url
        self.vision = {"image": b64(image), "top_k": 1}
        self.multimodal = {"image": b64(image), "text": "a cat on a sofa", "labels": ["cat", "car"]}
        self.results: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            n = index
            while not self._stop.is_set():
                n += 1
                if n % 2:
                    response = client.post("/v1/vision/classify", json=self.vision)
                    version = response.json().get("version") if response.status_code == 200 else None
                else:
                    response = client.post("/v1/multimodal/analyze", json=self.multimodal)
                    version = None
                self.results.append((time.monotonic(), response.status_code, version))

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

    def failures(self) -> list[tuple[float, int, str | None]]:
        return [r for r in self.results if r[1] != 200]


def vision_config(config: dict) -> dict:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == "VisionClassifier")


def vision_replica_count() -> int:
    return serve.status().applications[APP].deployments["VisionClassifier"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def folder(app_url, tmp_path_factory):
    path = tmp_path_factory.mktemp("updates")
    yield path
    deploy(shipped_config(), path / "shipped.yaml")  # back to the shipped version for later modules


def test_live_user_config_change_under_load_fails_no_request(folder, app_url, chelsea_jpeg):
    config = shipped_config()
    vision_config(config)["user_config"]["max_batch_size"] = 4
    with SteadyLoad(app_url, chelsea_jpeg) as load:
        deploy(config, folder / "batch4.yaml")
    assert load.results and not load.failures(), f"{len(load.failures())} of {len(load.results)} failed"
    replicas = replica_infos("VisionClassifier", vision_replica_count())
    assert {info["details"]["batching"]["max_batch_size"] for info in replicas.values()} == {4}


def test_new_model_version_rolls_out_under_load_and_fails_no_request(folder, app_url, chelsea_jpeg):
    before = httpx.get(f"{app_url}/v1/models").json()["models"]
    old_version = next(m["version"] for m in before if m["deployment"] == "vision")
    assert old_version != NEW_VERSION

    config = shipped_config()
    (app,) = config["applications"]
    app["args"]["vision"]["version"] = NEW_VERSION  # a new deployment version: replicas are replaced
    with SteadyLoad(app_url, chelsea_jpeg) as load:
        deploy(config, folder / "new_version.yaml")
        deadline = time.monotonic() + UPDATE_TIMEOUT_S
        while time.monotonic() < deadline:
            versions = {i["version"] for i in replica_infos("VisionClassifier", vision_replica_count()).values()}
            if versions == {NEW_VERSION}:
                break
            time.sleep(1)

    failures = load.failures()
    assert not failures, f"{len(failures)} of {len(load.results)} requests failed: {failures[:5]}"
    versions_seen = [version for _, _, version in load.results if version]
    assert old_version in versions_seen and NEW_VERSION in versions_seen
    assert versions_seen[-1] == NEW_VERSION  # the last answers come from the new version

    after = {m["deployment"]: m for m in httpx.get(f"{app_url}/v1/models").json()["models"]}
    assert after["vision"]["version"] == NEW_VERSION
    cat = httpx.post(f"{app_url}/v1/vision/classify", json={"image": b64(chelsea_jpeg), "top_k": 1}).json()
    assert cat["labels"][0]["label"] == "Egyptian cat" and cat["version"] == NEW_VERSION


def test_vision_replica_redoes_preprocessing_prepared_for_another_geometry(app_url):
    """What a caller holding a previous model's geometry sends during an update is still classified."""
    vision = serve.get_deployment_handle("VisionClassifier", app_name=APP)
    result = vision.classify.remote(np.full((300, 260, 3), 128, dtype=np.uint8), 1).result()
    assert len(result.labels) == 1
