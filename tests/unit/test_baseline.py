"""The benchmark's single-process baseline answers like the cluster, so `make bench` compares like with like."""

import pytest
from fastapi.testclient import TestClient

from tests.conftest import b64

LABELS = ["a photo of a cat", "a cup of coffee", "a rocket launch"]


@pytest.fixture(scope="module")
def baseline():
    from benchmarks.baseline_server import app  # loads both models

    with TestClient(app) as client:
        yield client


def test_the_baseline_classifies_a_cat(baseline, chelsea_jpeg):
    response = baseline.post("/v1/vision/classify", json={"image": b64(chelsea_jpeg), "top_k": 3})
    assert response.status_code == 200, response.text
    assert "cat" in response.json()["labels"][0]["label"]


def test_the_baseline_fuses_image_and_text(baseline, coffee_jpeg):
    payload = {"image": b64(coffee_jpeg), "text": "my morning espresso", "labels": LABELS}
    response = baseline.post("/v1/multimodal/analyze", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["fused"][0]["label"] == "a cup of coffee"
