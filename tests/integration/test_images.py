"""Images as they come from the wild: hostile ones cost the ingress bounded memory, real ones get the right answer."""

import pytest

from tests.conftest import b64

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}


def detail(response) -> str:
    return " | ".join(e["msg"] for e in response.json()["detail"])


def test_hostile_images_are_refused_with_the_reason_and_bounded_memory(
    client, ingress_peak_growth_mib, thin_png, wide_png, pixel_bomb_png, many_frames_gif
):
    """A 235-byte 1x40000 PNG once took the ingress to 13.4 GB (resizing its short side to 256 px)."""
    cases = [
        (thin_png, 422, "image is 1x40000 pixels, an aspect ratio of 40000:1; the limit is 20:1"),
        (wide_png, 422, "image is 40000x1 pixels, an aspect ratio of 40000:1; the limit is 20:1"),
        (pixel_bomb_png, 413, "20000x20000 = 400000000 pixels; the limit is 40000000 pixels"),
    ]
    for _ in range(3):  # both ingress replicas get some of each
        for image, status, reason in cases:
            for route, extra in (("/v1/vision/classify", {}), ("/v1/multimodal/analyze", {"labels": ["a cat"]})):
                response = client.post(route, json={"image": b64(image), **extra})
                assert response.status_code == status and reason in detail(response)
        # Only the first of its 501 large frames is decoded.
        gif = client.post("/v1/vision/classify", files={"image": ("anim.gif", many_frames_gif, "image/gif")})
        assert gif.status_code == 200, gif.text
    assert ingress_peak_growth_mib() < 150


def test_a_16_bit_photo_is_classified_like_the_8_bit_one(client, chelsea_png16, chelsea_png8_grey):
    """16-bit greyscale once became an all-white image ("can opener")."""
    answers = []
    for image in (chelsea_png8_grey, chelsea_png16):
        response = client.post("/v1/vision/classify", json={"image": b64(image), "top_k": 1})
        assert response.status_code == 200, response.text
        answers.append(response.json()["labels"][0])
    assert answers[0]["label"] == answers[1]["label"] and answers[1]["label"] in CAT_CLASSES
    assert answers[1]["score"] == pytest.approx(answers[0]["score"], abs=0.02)


def test_a_sideways_phone_photo_is_turned_upright_by_its_exif_orientation(
    client, chelsea_jpeg, chelsea_exif_rotated_jpeg
):
    upright = client.post("/v1/vision/classify", json={"image": b64(chelsea_jpeg), "top_k": 1}).json()
    rotated = client.post("/v1/vision/classify", files={"image": ("cat.jpg", chelsea_exif_rotated_jpeg)}).json()
    assert rotated["labels"][0]["label"] == upright["labels"][0]["label"] == "Egyptian cat"
    assert rotated["labels"][0]["score"] == pytest.approx(upright["labels"][0]["score"], abs=0.05)
