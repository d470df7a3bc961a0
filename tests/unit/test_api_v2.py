"""The Open Inference Protocol routes through TestClient with a fake dataplane: metadata, tensors, errors."""

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from tests.unit.fake_dataplane import VERSIONS, FakeDataplane, client, label_scores, text_vector


def png(red: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), (red, 0, 0), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor(name: str, values: list, datatype: str = "BYTES") -> dict:
    return {"name": name, "datatype": datatype, "shape": [len(values)], "data": values}


def binary_request(inputs: dict[str, list[bytes]], outputs: list[str] | None = None, **parameters) -> tuple:
    """A request in the binary tensor extension: JSON header, then each BYTES input length-prefixed."""
    blobs = [b"".join(struct.pack("<I", len(e)) + e for e in elements) for elements in inputs.values()]
    header = {
        "inputs": [
            {"name": name, "datatype": "BYTES", "shape": [len(elements)], "parameters": {"binary_data_size": len(blob)}}
            for (name, elements), blob in zip(inputs.items(), blobs)
        ],
        "parameters": parameters,
    }
    if outputs is not None:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": True}} for name in outputs]
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text))}


def outputs_of(response) -> dict[str, np.ndarray]:
    """Outputs of a JSON or binary response, as arrays."""
    length = response.headers.get("inference-header-content-length")
    header = json.loads(response.content[: int(length)] if length else response.content)
    rest, arrays = response.content[int(length) :] if length else b"", {}
    for output in header["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.array(output["data"]).reshape(output["shape"])
            continue
        blob, rest = rest[:size], rest[size:]
        assert output["datatype"] == "FP32"
        arrays[output["name"]] = np.frombuffer(blob, "<f4").reshape(output["shape"])
    return arrays


@pytest.fixture(scope="module")
def api():
    return client()


def test_server_metadata_and_health(api):
    assert api.get("/v2").json() == {"name": "maas-cluster", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert api.get("/v2/health/live").json() == {"live": True}
    assert api.get("/v2/health/ready").json() == {"ready": True}
    assert api.get("/v2/models/vision/ready").json() == {"name": "vision", "ready": True}


def test_not_ready_is_a_503():
    api = client(FakeDataplane(unavailable={"fusion"}))
    assert api.get("/v2/health/ready").status_code == 503
    assert api.get("/v2/models/fusion/ready").status_code == 503
    assert api.get("/v2/models/vision/ready").status_code == 200


def test_model_metadata_names_tensors_datatypes_and_shapes(api):
    meta = api.get("/v2/models/vision").json()
    assert meta["name"] == "vision" and meta["versions"] == [VERSIONS["vision"]]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "labels": [-1, -1],
        "probabilities": [-1, -1],
        "embedding": [-1, 3],
    }
    assert meta["parameters"]["tensors"]["image"].startswith("Encoded images")
    assert api.get("/v2/models/text").json()["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 4]}]
    version = VERSIONS["vision"]  # holds a slash
    assert api.get(f"/v2/models/vision/versions/{version}").json()["name"] == "vision"
    assert api.get(f"/v2/models/vision/versions/{version}/ready").json()["ready"] is True


def test_vision_json_batch_equals_single_calls(api):
    request = {"id": "r1", "inputs": [tensor("image", [b64(png(13)), b64(png(25))])], "parameters": {"top_k": 3}}
    response = api.post("/v2/models/vision/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and body["model_name"] == "vision" and body["model_version"] == VERSIONS["vision"]
    arrays = outputs_of(response)
    assert arrays["labels"].tolist() == [["class3", "class4", "class5"], ["class5", "class6", "class7"]]
    assert arrays["probabilities"].shape == (2, 3) and "embedding" not in arrays
    for index, red in enumerate((13, 25)):
        single = api.post(
            "/v2/models/vision/infer", json={"inputs": [tensor("image", [b64(png(red))])], "parameters": {"top_k": 3}}
        )
        assert outputs_of(single)["labels"][0].tolist() == arrays["labels"][index].tolist()


def test_vision_binary_in_and_out_with_the_embedding(api):
    body, headers = binary_request({"image": [png(13), png(14), png(15)]}, outputs=["probabilities", "embedding"])
    response = api.post("/v2/models/vision/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    arrays = outputs_of(response)
    assert arrays["embedding"].shape == (3, 3) and arrays["embedding"][:, 0].tolist() == [3, 4, 5]
    assert arrays["probabilities"][0].tolist() == [0.5, 0.25, 0.125, 0.0625, 0.03125]


def test_binary_data_output_asks_for_every_output_in_binary(api):
    body, headers = binary_request({"text": ["tea".encode(), "a cake".encode()]}, binary_data_output=True)
    response = api.post("/v2/models/text/infer", content=body, headers=headers)
    embedding = outputs_of(response)["embedding"]
    np.testing.assert_allclose(embedding, np.stack([text_vector("tea"), text_vector("a cake")]), rtol=1e-6)


def test_text_json(api):
    response = api.post("/v2/models/text/infer", json={"inputs": [tensor("text", ["tea"])]})
    np.testing.assert_allclose(outputs_of(response)["embedding"][0], text_vector("tea"), rtol=1e-6)
    assert response.json()["outputs"][0]["datatype"] == "FP32"


def test_fusion_scores_labels_in_their_order(api):
    labels = ["class3", "tea", "zzz"]
    request = {"inputs": [tensor("image", [b64(png(13))]), tensor("text", ["tea"]), tensor("labels", labels)]}
    response = api.post("/v2/models/fusion/infer", json=request)
    arrays = outputs_of(response)
    assert set(arrays) == {"scores", "vision_scores", "text_scores"}
    np.testing.assert_allclose(arrays["text_scores"][0], label_scores("tea", labels), rtol=1e-6)
    assert arrays["scores"].shape == (1, 3)
    text_only = api.post(
        "/v2/models/fusion/infer",
        json={"inputs": [tensor("text", ["tea", "b"]), tensor("labels", labels)], "parameters": {"text_weight": 1}},
    )
    assert set(outputs_of(text_only)) == {"scores", "text_scores"} and outputs_of(text_only)["scores"].shape == (2, 3)


@pytest.mark.parametrize(
    ("path", "request_body", "status", "words"),
    [
        ("/v2/models/nothing/infer", {"inputs": [tensor("image", ["x"])]}, 404, "no model named 'nothing'"),
        ("/v2/models/vision/versions/7/infer", {"inputs": [tensor("image", [b64(png(1))])]}, 404, "no version '7'"),
        ("/v2/models/vision/infer", {"inputs": [tensor("picture", ["x"])]}, 400, "no input 'picture'"),
        ("/v2/models/vision/infer", {"inputs": [tensor("image", [1.5], "FP32")]}, 400, "datatype BYTES, not FP32"),
        ("/v2/models/vision/infer", {"inputs": [{**tensor("image", ["a", "b"]), "shape": [3]}]}, 400, "has 2 elements"),
        ("/v2/models/vision/infer", {"inputs": [{**tensor("image", ["a"]), "shape": [1, 1]}]}, 400, "shape [N]"),
        ("/v2/models/vision/infer", {"inputs": [tensor("image", ["a"] * 17)]}, 400, "N from 1 to 16"),
        ("/v2/models/vision/infer", {"inputs": [tensor("image", [b64(b"not an image")])]}, 400, "image"),
        (
            "/v2/models/vision/infer",
            {"inputs": [tensor("image", [b64(png(1))])], "parameters": {"top_k": 0}},
            400,
            "top_k",
        ),
        (
            "/v2/models/vision/infer",
            {"inputs": [tensor("image", [b64(png(1))])], "outputs": [{"name": "logits"}]},
            400,
            "no output 'logits'",
        ),
        ("/v2/models/vision/infer", {"inputs": [{"name": "image", "datatype": "BYTES"}]}, 400, "shape"),
        ("/v2/models/text/infer", {"inputs": [tensor("text", ["  "])]}, 400, "element 0 is blank"),
        ("/v2/models/fusion/infer", {"inputs": [tensor("labels", ["a"])]}, 400, "input 'image', input 'text', or both"),
        (
            "/v2/models/fusion/infer",
            {"inputs": [tensor("text", ["t"]), tensor("labels", ["a"])], "outputs": [{"name": "vision_scores"}]},
            400,
            "needs an input",
        ),
    ],
)
def test_errors_are_the_specs_error_object(api, path, request_body, status, words):
    response = api.post(path, json=request_body)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and words in response.json()["error"]


def test_malformed_bodies_are_400s(api):
    assert (
        api.post("/v2/models/text/infer", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    )
    body, headers = binary_request({"text": [b"tea"]})
    short = api.post("/v2/models/text/infer", content=body[:-1], headers=headers)
    assert short.status_code == 400 and "binary" in short.json()["error"]
    wrong = api.post("/v2/models/text/infer", content=body, headers={"Inference-Header-Content-Length": "99999"})
    assert wrong.status_code == 400
    body, headers = binary_request({"text": [b"\xff\xfe"]})
    invalid = api.post("/v2/models/text/infer", content=body, headers=headers)
    assert invalid.status_code == 400 and "not valid UTF-8" in invalid.json()["error"]
    lone_surrogate = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\\udcff"]}]}'
    response = api.post("/v2/models/text/infer", content=lone_surrogate)
    assert response.status_code == 400, response.text


def test_compressed_and_oversized_bodies_are_refused(api):
    gz = api.post("/v2/models/text/infer", content=b"x", headers={"content-encoding": "gzip"})
    assert gz.status_code == 415 and "error" in gz.json()
    big = api.post(
        "/v2/models/text/infer",
        content=b"{}",
        headers={"content-length": "99999999", "content-type": "application/json"},
    )
    assert big.status_code == 413 and "error" in big.json()


def test_payloads_are_not_echoed_in_errors(api):
    secret = "my-secret-text-" * 10
    response = api.post("/v2/models/text/infer", json={"inputs": [tensor("text", [secret]), tensor("text", [secret])]})
    assert response.status_code == 400 and secret not in response.text


def test_unavailable_models_and_admission_refusals_are_503_with_retry_after():
    response = client(FakeDataplane(unavailable={"text"})).post(
        "/v2/models/text/infer", json={"inputs": [tensor("text", ["a"])]}
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "1" and "error" in response.json()
    api = client(admission={"/v2/models/{model_name}/infer": 1})
    api.app.state.admission.acquire("/v2/models/{model_name}/infer")
    refused = api.post("/v2/models/vision/infer", json={"inputs": [tensor("image", ["a"])]})
    assert refused.status_code == 503 and "limit" in refused.json()["error"]


def test_an_unknown_v2_route_is_a_404_error_object(api):
    assert api.get("/v2/repository/index").json() == {"error": "Not Found"}
