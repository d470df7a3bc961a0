"""The /v1 routes and health routes through TestClient with a fake dataplane: shapes, statuses, error bodies."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import build_app
from api.context import ApiSettings
from deployments.admission import Admission
from tests.unit.fake_dataplane import CLASSES, FakeDataplane, NullMetrics, client


def png(red: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), (red, 0, 0), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def api():
    return client()


def test_classify_renders_the_vision_result(api):
    response = api.post("/v1/vision/classify", json={"image": b64(png(13)), "top_k": 2})
    assert response.status_code == 200
    body = response.json()
    assert [item["label"] for item in body["labels"]] == [CLASSES[3], CLASSES[4]]
    assert body["embedding"] is None and body["model"] == "vision-model"
    assert "ingress;dur=" in response.headers["server-timing"]


def test_classify_takes_a_multipart_upload_and_returns_the_embedding(api):
    response = api.post("/v1/vision/classify", files={"image": ("a.png", png(21))}, data={"embed": "true"})
    assert response.status_code == 200, response.text
    assert response.json()["labels"][0]["label"] == CLASSES[1]
    assert len(response.json()["embedding"]) == 3


def test_text_routes(api):
    embedded = api.post("/v1/text/embed", json={"texts": ["a cat", "tea"]}).json()
    assert embedded["dim"] == 4 and len(embedded["embeddings"]) == 2
    ranked = api.post("/v1/text/classify", json={"text": "cats", "labels": ["dog", "cats"]}).json()
    assert ranked["labels"][0]["label"] == "cats"


def test_multimodal_fuses_both_branches(api):
    body = {"image": b64(png(13)), "text": "class3", "labels": ["class3", "zzz"], "vision_weight": 0.7}
    result = api.post("/v1/multimodal/analyze", json=body).json()
    assert result["fused"][0]["label"] == "class3"
    assert result["vision"]["classes"][0]["label"] == "class3" and result["text"] is not None
    assert result["method"] == "conse+late-fusion"


def test_a_text_only_analysis_has_no_vision_branch(api):
    result = api.post("/v1/multimodal/analyze", json={"text": "tea", "labels": ["tea", "x"]}).json()
    assert result["vision"] is None and result["fused"][0]["label"] == "tea"


def test_validation_errors_say_what_and_where_without_echoing_the_input(api):
    secret = "s3cret-" * 10
    response = api.post("/v1/text/classify", json={"text": secret, "labels": ["a", "a"]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "labels"] and "distinct" in error["msg"]
    assert secret not in response.text


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error_type"),
    [
        ({"content": b"text=hi", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"json": {"image": "bm90IGFuIGltYWdl"}}, 422, "invalid_image"),
        ({"content": b"{}", "headers": {"content-type": "application/json", "content-length": "99999999"}}, 413, None),
    ],
)
def test_errors_are_detail_lists_with_their_status(api, request_kwargs, status, error_type):
    response = api.post("/v1/vision/classify", **request_kwargs)
    assert response.status_code == status
    (error,) = response.json()["detail"]
    assert set(error) >= {"loc", "msg", "type"}
    if error_type:
        assert error["type"] == error_type


def test_an_unknown_route_and_a_wrong_method_keep_the_detail_shape(api):
    assert api.get("/v1/nothing").json() == {"detail": [{"loc": [], "msg": "Not Found", "type": "http_error"}]}
    assert api.get("/v1/vision/classify").status_code == 405


def test_an_unavailable_model_is_a_503_with_retry_after():
    response = client(FakeDataplane(unavailable={"vision"})).post("/v1/vision/classify", json={"image": b64(png(1))})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["detail"][0]["type"] == "model_unavailable"


def test_a_route_at_its_admission_limit_refuses_before_reading_the_body():
    api = client(admission={"/v1/text/embed": 1})
    admission = api.app.state.admission
    assert admission.acquire("/v1/text/embed")
    response = api.post("/v1/text/embed", content=b"not even json", headers={"content-type": "application/json"})
    assert response.status_code == 503 and response.json()["detail"][0]["type"] == "overloaded"
    admission.release("/v1/text/embed")
    assert api.post("/v1/text/embed", json={"texts": ["ok"]}).status_code == 200


def test_models_and_readiness_read_the_registry(api):
    models = api.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["vision", "text", "fusion", "ocr", "llm", "explainer", "asr", "tts"]
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["deployments"]["text"]["version"] == "text==2"
    assert api.get("/healthz").json() == {"status": "ok"}


def test_readiness_names_the_model_that_is_not_ready():
    response = client(FakeDataplane(unavailable={"text"})).get("/readyz")
    assert response.status_code == 503
    assert response.json()["deployments"]["text"] == {
        "ready": False,
        "model": None,
        "version": None,
        "message": "ModelUnavailable",
    }


def test_every_request_is_counted_by_route_template_and_error_type():
    metrics = NullMetrics()
    api = TestClient(build_app(FakeDataplane(), Admission({}), ApiSettings(), metrics))
    api.post("/v1/vision/classify", json={"image": "bm90IGFuIGltYWdl"})
    api.get("/v2/models/nothing")
    assert metrics.requests == [
        ("/v1/vision/classify", 422, "invalid_image"),
        ("/v2/models/{model_name}", 404, "model_not_found"),
    ]
