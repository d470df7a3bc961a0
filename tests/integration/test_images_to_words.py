"""Image to words to answers against the deployed app: OCR, grounded descriptions, and images in OpenAI chat
(through OpenAI's own client), with the real models."""

import io

import numpy as np
import openai
import pytest
from PIL import Image
from ray import serve
from skimage import data

from tests.conftest import PAGE_LINES, b64, encode, rendered_words, same_line, squeezed
from tests.serving import APP

RENDERED_WORDS = "OPEN SESAME"
QUESTION = "What does the text say?"
REMOTE, NOT_AN_IMAGE = "https://example.com/cat.jpg", "data:image/png;base64,bm90IGFuIGltYWdl"


def rendered_text(words: str = RENDERED_WORDS) -> bytes:
    return encode(rendered_words(words), "PNG")


def page_png() -> bytes:
    return encode(Image.fromarray(data.page()).convert("RGB"), "PNG")


def data_url(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{b64(image)}"


def image_part(image: bytes, media_type: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image, media_type)}}


@pytest.fixture(scope="module")
def llm(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client
    client.close()


# --- OCR ------------------------------------------------------------------------------------


def test_ocr_reads_most_lines_of_a_scanned_page_in_reading_order(client):
    response = client.post("/v1/vision/ocr", json={"image": b64(page_png())})
    assert response.status_code == 200, response.text
    body = response.json()
    read = [squeezed(line["text"]) for line in body["lines"]]
    found = [line for line in PAGE_LINES if any(same_line(r, line) for r in read)]
    assert len(found) >= 4, (read, found)
    tops = [min(y for _, y in line["box"]) for line in body["lines"]]
    assert tops == sorted(tops)
    assert (body["width"], body["height"]) == (384, 191) and body["model"] == "PP-OCRv4"
    for line in body["lines"]:
        assert 0.5 <= line["confidence"] <= 1 and len(line["box"]) == 4
        assert all(0 <= x <= 384 and 0 <= y <= 191 for x, y in line["box"])


def test_ocr_reads_rendered_words_from_a_multipart_upload(client):
    response = client.post("/v1/vision/ocr", files={"image": ("words.png", rendered_text(), "image/png")})
    assert response.status_code == 200, response.text
    assert [squeezed(line["text"]) for line in response.json()["lines"]] == [squeezed(RENDERED_WORDS)]


def test_ocr_of_a_photo_without_text_is_no_lines_not_an_error(client, chelsea_jpeg):
    response = client.post("/v1/vision/ocr", json={"image": b64(chelsea_jpeg)})
    assert response.status_code == 200, response.text
    assert response.json()["lines"] == [] and response.json()["truncated"] is False


def test_ocr_boxes_are_in_the_uploaded_images_pixels_when_it_is_reduced_for_the_engine(client):
    """A 4000 px wide page is read at 2000 px; its boxes come back in the 4000 px image's coordinates."""
    small = Image.open(io.BytesIO(rendered_text()))
    large = small.resize((small.width * 5, small.height * 5), Image.Resampling.BICUBIC)
    answers = [
        client.post("/v1/vision/ocr", json={"image": b64(encode(image, "PNG"))}).json() for image in (small, large)
    ]
    (line,), (large_line,) = answers[0]["lines"], answers[1]["lines"]
    assert squeezed(large_line["text"]) == squeezed(RENDERED_WORDS)
    assert np.allclose(np.array(large_line["box"]) / 5, np.array(line["box"]), atol=6)


def test_ocr_in_a_batch_reads_as_it_does_alone():
    """Images sent together share a batch (their lines recognised together), and read exactly as alone."""
    reader = serve.get_deployment_handle("TextReader", app_name=APP)
    page = np.stack([data.page()] * 3, axis=-1)
    words = np.asarray(Image.open(io.BytesIO(rendered_text())))
    images = [page, words, data.chelsea(), np.ascontiguousarray(page[:120])]
    alone = [reader.read.remote(image).result() for image in images]
    together = []
    for _ in range(5):  # the replicas' batch window is short: try until one batch took more than one image
        together = [response.result() for response in [reader.read.remote(image) for image in images]]
        if max(result.batch_size for result in together) > 1:
            break
    assert max(result.batch_size for result in together) > 1
    for single, batched in zip(alone, together):
        assert [line.text for line in batched.lines] == [line.text for line in single.lines]
        assert [line.box for line in batched.lines] == [line.box for line in single.lines]
        assert np.allclose([line.confidence for line in batched.lines], [line.confidence for line in single.lines],
                           atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "request_kwargs, status, error_type",
    [
        ({"json": {}}, 422, "missing"),
        ({"json": {"image": b64(b"not an image at all")}}, 422, "invalid_image"),
        ({"json": {"image": "%%% not base64 %%%"}}, 422, "invalid_input"),
        ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"json": {"image": b64(rendered_text()), "top_k": 3}}, 422, "extra_forbidden"),
    ],
)
def test_ocr_refuses_bad_input_with_a_message(client, request_kwargs, status, error_type):
    response = client.post("/v1/vision/ocr", **request_kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"][0]
    assert detail["type"] == error_type and detail["msg"]


# --- grounded descriptions ---------------------------------------------------------------------


def test_describe_chelsea_mentions_a_cat_and_shows_its_evidence(client, chelsea_jpeg):
    response = client.post("/v1/multimodal/describe", json={"image": b64(chelsea_jpeg)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "cat" in body["description"].lower(), body
    classes = [c["label"] for c in body["evidence"]["classes"]]
    assert classes and classes[0] in ("Egyptian cat", "tabby", "tiger cat") and body["evidence"]["text"] == []
    assert all(c["score"] >= 0.1 for c in body["evidence"]["classes"])
    assert classes[0] in body["evidence"]["prompt"] and "Text read: no text." in body["evidence"]["prompt"]
    assert set(body["models"]) == {"vision", "ocr", "llm"} and body["usage"]["completion_tokens"] > 0
    assert set(body["seconds"]) == {"vision", "ocr", "llm"}


def test_describe_coffee_from_a_multipart_upload_mentions_coffee_or_a_cup(client, coffee_jpeg):
    response = client.post("/v1/multimodal/describe", files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "coffee" in body["description"].lower() or "cup" in body["description"].lower(), body
    assert "espresso" in [c["label"] for c in body["evidence"]["classes"]]


def test_describe_quotes_the_text_it_read(client):
    body = client.post("/v1/multimodal/describe", json={"image": b64(rendered_text())}).json()
    assert [squeezed(line["text"]) for line in body["evidence"]["text"]] == [squeezed(RENDERED_WORDS)]
    assert RENDERED_WORDS.lower() in body["description"].lower(), body


@pytest.mark.parametrize(
    "payload, status, field",
    [
        ({}, 422, "image"),
        ({"image": b64(b"GIF89a but not really")}, 422, "image"),
        ({"image": "placeholder", "max_tokens": 129}, 422, "max_tokens"),
        ({"image": "placeholder", "max_tokens": 0}, 422, "max_tokens"),
    ],
)
def test_describe_refuses_bad_input_naming_the_field(client, chelsea_jpeg, payload, status, field):
    payload = {**payload, "image": b64(chelsea_jpeg)} if payload.get("image") == "placeholder" else payload
    response = client.post("/v1/multimodal/describe", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["detail"][0]["loc"][-1] == field and response.json()["detail"][0]["msg"]


# --- images in OpenAI chat ---------------------------------------------------------------------


def test_chat_with_a_cat_photo_says_it_is_a_cat(llm, chelsea_jpeg):
    question = {"type": "text", "text": "What animal is in this picture?"}
    answer = llm.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": [question, image_part(chelsea_jpeg, "image/jpeg")]}],
        temperature=0, max_tokens=40,
    )  # fmt: skip
    assert "cat" in answer.choices[0].message.content.lower(), answer


def test_chat_reads_the_text_in_an_image_streaming(llm):
    stream = llm.chat.completions.create(
        model="llm",
        messages=[{"role": "user", "content": [image_part(rendered_text()), {"type": "text", "text": QUESTION}]}],
        temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert RENDERED_WORDS.lower() in text.lower(), text
    assert chunks[-1].usage.prompt_tokens > 50  # the evidence is in the prompt


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"type": "image_url", "image_url": {"url": REMOTE}}], "remote image URLs are not fetched"),
        ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "base64-encoded image"),
        ([{"type": "image_url", "image_url": {"url": NOT_AN_IMAGE}}], "not a decodable image"),
    ],
)
def test_chat_refuses_an_image_it_cannot_use_with_a_400_that_says_why(llm, content, message):
    with pytest.raises(openai.BadRequestError) as refused:
        llm.chat.completions.create(model="llm", messages=[{"role": "user", "content": content}], max_tokens=5)
    assert message in refused.value.body["message"] and refused.value.body["param"].startswith("messages.0.content.0")


def test_chat_refuses_more_images_than_its_limit(llm):
    tiny = image_part(rendered_text())
    with pytest.raises(openai.BadRequestError) as refused:
        llm.chat.completions.create(model="llm", messages=[{"role": "user", "content": [tiny] * 5}], max_tokens=5)
    assert "5 images; at most 4 in one chat" in refused.value.body["message"]


def test_chat_with_two_images_gives_the_model_the_evidence_of_each(llm, chelsea_jpeg, coffee_jpeg):
    question = {"type": "text", "text": "Describe the images."}

    def prompt_tokens(*images: bytes) -> int:
        parts = [image_part(image, "image/jpeg") for image in images]
        answer = llm.chat.completions.create(model="llm", messages=[{"role": "user", "content": [*parts, question]}],
                                             temperature=0, max_tokens=1)  # fmt: skip
        return answer.usage.prompt_tokens

    one, two = prompt_tokens(chelsea_jpeg), prompt_tokens(chelsea_jpeg, coffee_jpeg)
    assert two - one >= 15  # "[Image 2]", its classes and its text
