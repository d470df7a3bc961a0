"""Every kind of bad input gets a clear 4xx that says what was wrong, and never a 500."""

import base64
import os

from tests.conftest import b64

LABELS = ["a photo of a cat", "a cup of coffee"]


def detail(response) -> str:
    """All error messages of a response, joined, for matching."""
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in response.json()["detail"])


def test_bytes_that_are_not_an_image(client):
    response = client.post("/v1/vision/classify", json={"image": b64(b"just some text, no picture here")})
    assert response.status_code == 422
    assert "body.image: image is not a decodable image" in detail(response)


def test_truncated_image(client, truncated_jpeg):
    response = client.post("/v1/vision/classify", files={"image": ("cat.jpg", truncated_jpeg, "image/jpeg")})
    assert response.status_code == 422
    assert "truncated or corrupt" in detail(response)


def test_image_too_many_pixels(client, pixel_bomb_png):
    response = client.post("/v1/multimodal/analyze", json={"image": b64(pixel_bomb_png), "labels": LABELS})
    assert response.status_code == 413
    assert "20000x20000 = 400000000 pixels; the limit is 40000000 pixels" in detail(response)


def test_image_too_many_bytes(client):
    big = os.urandom(10 * 1024 * 1024 + 1)
    response = client.post("/v1/vision/classify", files={"image": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413
    assert "larger than the limit of 10485760 bytes" in detail(response)


def test_request_body_too_large(client):
    response = client.post(
        "/v1/vision/classify", content=b"{" + b" " * (16 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "the limit is 16777216 bytes" in detail(response)


def test_bad_base64(client):
    response = client.post("/v1/vision/classify", json={"image": "not*base64*at*all"})
    assert response.status_code == 422
    assert "body.image: image is not valid base64" in detail(response)


def test_empty_image(client):
    response = client.post("/v1/vision/classify", json={"image": ""})
    assert response.status_code == 422
    assert "body.image: String should have at least 1 character" in detail(response)
    response = client.post("/v1/vision/classify", files={"image": ("a.jpg", b"", "image/jpeg")})
    assert response.status_code == 422
    assert "image is empty" in detail(response)


def test_empty_or_blank_text(client):
    for text in ("", "  ", "\r"):
        response = client.post("/v1/text/classify", json={"text": text, "labels": LABELS})
        assert response.status_code == 422
        assert detail(response).startswith("body.text: String should")


def test_text_too_long(client):
    for text in ("x" * 4097, " " + "x" * 4096):  # the limit is on the text as sent
        response = client.post("/v1/text/embed", json={"texts": [text]})
        assert response.status_code == 422
        assert "body.texts.0: String should have at most 4096 characters" in detail(response)


def test_duplicate_labels(client):
    for route, payload in (
        ("/v1/multimodal/analyze", {"text": "hello", "labels": ["cat", "cat"]}),
        ("/v1/text/classify", {"text": "hello", "labels": ["cat", "dog", "cat"]}),
    ):
        response = client.post(route, json=payload)
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {
                "type": "value_error",
                "loc": ["body", "labels"],
                "msg": "Value error, labels must be distinct",
                "ctx": {"error": "labels must be distinct"},
            }
        ]


def test_form_field_that_is_not_utf8_is_refused(client, coffee_jpeg):
    form = (
        b'--b\r\ncontent-disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"content-type: image/jpeg\r\n\r\n" + coffee_jpeg + b"\r\n"
        b'--b\r\ncontent-disposition: form-data; name="labels"\r\n\r\ncaf\xe9\r\n'
        b'--b\r\ncontent-disposition: form-data; name="labels"\r\n\r\ntea\r\n--b--\r\n'
    )
    response = client.post(
        "/v1/multimodal/analyze", content=form, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422
    assert detail(response) == "body.labels: form field is not valid utf-8 text"


def test_errors_do_not_echo_the_input(client):
    response = client.post("/v1/text/embed", content=b"x", headers={"content-type": "text/" + "q" * 5000})
    assert response.status_code == 415 and b"qqq" not in response.content

    response = client.post("/v1/vision/classify", json={"image": "A" * 100_000, "extra": "B" * 100_000})
    assert response.status_code == 422
    assert len(response.content) < 2000


def test_empty_labels(client):
    response = client.post("/v1/text/classify", json={"text": "hello", "labels": []})
    assert response.status_code == 422
    assert "body.labels: List should have at least 1 item" in detail(response)


def test_too_many_labels(client):
    response = client.post("/v1/text/classify", json={"text": "hello", "labels": [f"l{i}" for i in range(33)]})
    assert response.status_code == 422
    assert "body.labels: List should have at most 32 items" in detail(response)


def test_unknown_field(client, coffee_jpeg):
    response = client.post("/v1/vision/classify", json={"image": b64(coffee_jpeg), "topk": 3})
    assert response.status_code == 422
    assert "body.topk: Extra inputs are not permitted" in detail(response)


def test_wrong_content_type(client):
    response = client.post("/v1/text/embed", content=b"texts=hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert detail(response) == "body: Content-Type must be application/json"


def test_form_on_a_json_only_route(client):
    response = client.post("/v1/text/embed", data={"texts": "hello"})
    assert response.status_code == 415


def test_malformed_json(client):
    response = client.post("/v1/text/embed", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "Invalid JSON" in detail(response)


def test_multimodal_needs_an_image_or_a_text(client):
    response = client.post("/v1/multimodal/analyze", json={"labels": LABELS})
    assert response.status_code == 422
    assert "send an image, a text, or both" in detail(response)


def test_multipart_without_the_image(client):
    response = client.post("/v1/vision/classify", files={"picture": ("a.jpg", b"xx", "image/jpeg")})
    assert response.status_code == 422
    assert "send the image in field 'image'" in detail(response)


def test_more_than_one_file(client, coffee_jpeg):
    files = [("image", ("a.jpg", coffee_jpeg, "image/jpeg")), ("image", ("b.jpg", coffee_jpeg, "image/jpeg"))]
    response = client.post("/v1/vision/classify", files=files)
    assert response.status_code == 400
    assert "Too many files" in detail(response)


def test_unknown_route_and_wrong_method(client):
    assert client.get("/v1/nothing").status_code == 404
    response = client.get("/v1/vision/classify")
    assert response.status_code == 405
    assert detail(response) == ": Method Not Allowed"


def test_zero_fusion_weights(client):
    response = client.post(
        "/v1/multimodal/analyze", json={"text": "hi", "labels": LABELS, "vision_weight": 1, "text_weight": 0}
    )
    assert response.status_code == 422
    assert "(text_weight) are 0" in detail(response)


def test_service_is_healthy_after_bad_input(client, coffee_jpeg):
    assert client.get("/healthz").status_code == 200
    response = client.post("/v1/vision/classify", json={"image": base64.b64encode(coffee_jpeg).decode()})
    assert response.json()["labels"][0]["label"] == "espresso"
