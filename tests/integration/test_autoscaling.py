"""The vision deployment scales up under sustained load and back down when it stops.

Runs the shipped config with short autoscaling delays (a test-only change),
then restores the shipped config.
"""

import threading
import time

import httpx
import pytest

from tests.conftest import b64
from tests.integration.conftest import deploy, replicas, shipped_config

FAST_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
}
LOAD_CONCURRENCY = 12
SCALE_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def fast_autoscaling(app_url, tmp_path_factory):
    config = shipped_config()
    (app,) = config["applications"]
    vision = next(d for d in app["deployments"] if d["name"] == "VisionClassifier")
    vision["autoscaling_config"] = FAST_AUTOSCALING
    folder = tmp_path_factory.mktemp("autoscaling")
    deploy(config, folder / "fast.yaml")
    yield
    deploy(shipped_config(), folder / "shipped.yaml")


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_vision_scales_up_under_load_and_back_down(fast_autoscaling, app_url, chelsea_jpeg):
    assert wait_for(lambda: replicas("VisionClassifier") == 1, SCALE_TIMEOUT_S), "did not start from 1 replica"
    stop = threading.Event()
    payload = {"image": b64(chelsea_jpeg), "top_k": 1}
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=app_url, timeout=60) as client:
            deadline = time.monotonic() + SCALE_TIMEOUT_S + 30
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(client.post("/v1/vision/classify", json=payload).status_code)

    workers = [threading.Thread(target=load) for _ in range(LOAD_CONCURRENCY)]
    for worker in workers:
        worker.start()
    try:
        scaled_up = wait_for(lambda: replicas("VisionClassifier") == 2, SCALE_TIMEOUT_S)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert scaled_up, "vision did not scale to 2 replicas under sustained load"
    assert statuses and set(statuses) == {200}

    assert wait_for(lambda: replicas("VisionClassifier") == 1, SCALE_TIMEOUT_S), (
        "vision did not scale back to 1 replica after the load stopped"
    )
