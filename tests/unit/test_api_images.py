"""Images through HTTP over the fake dataplane: OCR, grounded descriptions, and images in OpenAI chat.

The fakes answer from their inputs: OCR reads one line, "GREEN <level>", in an image whose mean green level is
over 128; the vision model's best class is ``class<mean red level mod 10>``; the language model echoes "you said
<its last message>", so an answer shows what the language model was given.
"""

import base64
import io

import pytest
from PIL import Image

from api.openai.schemas import MAX_IMAGE_URL_CHARS
from deployments.settings import limits
from pipelines.grounding import CHAT_SYSTEM
from tests.unit.fake_dataplane import FakeDataplane, client, events

GREENISH = (200, 200, 10)  # green over 128: OCR reads "GREEN 200"; red 200: class0
DARK = (10, 10, 10)  # no text; red 10: class0
GREENISH_PROMPT = 'Objects recognised: class0 (50%), class1 (25%), class2 (12%).\nText read: "GREEN 200".'


def png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + b64(png(colour))


NOT_AN_IMAGE = b64(b"this is a secret payload, not an image at all " * 8)


def generated(dataplane) -> list:
    """The generation requests the language model received."""
    return [call[1] for call in dataplane.calls if call[0] == "generate"]


# --- /v1/vision/ocr -----------------------------------------------------------------


def test_ocr_reads_a_base64_image_and_reports_its_size(api):
    response = api.post("/v1/vision/ocr", json={"image": b64(png(GREENISH, (80, 48)))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["lines"] == [
        {"text": "GREEN 200", "confidence": 0.9, "box": [[0.0, 0.0], [80.0, 0.0], [80.0, 48.0], [0.0, 48.0]]}
    ]
    assert (body["width"], body["height"]) == (80, 48)
    assert body["truncated"] is False
    assert (body["model"], body["version"]) == ("ocr-model", "ocr==4/abc")


def test_ocr_reads_a_multipart_upload(api):
    response = api.post("/v1/vision/ocr", files={"image": ("sign.png", png(GREENISH, (30, 70)), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [line["text"] for line in body["lines"]] == ["GREEN 200"]
    assert (body["width"], body["height"]) == (30, 70)


def test_ocr_of_an_image_without_text_has_no_lines(api):
    response = api.post("/v1/vision/ocr", json={"image": b64(png(DARK))})
    assert response.status_code == 200, response.text
    assert response.json()["lines"] == []


def test_ocr_accepts_a_data_url_prefix(api):
    response = api.post("/v1/vision/ocr", json={"image": data_url(GREENISH)})
    assert response.status_code == 200 and response.json()["lines"][0]["text"] == "GREEN 200"


def test_ocr_refuses_what_is_not_an_image_without_echoing_it(api):
    response = api.post("/v1/vision/ocr", json={"image": NOT_AN_IMAGE})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["type"] == "invalid_image" and error["loc"] == ["body", "image"]
    assert NOT_AN_IMAGE not in response.text


# --- /v1/multimodal/describe ------------------------------------------------------------


def test_describe_returns_the_description_with_its_evidence_models_usage_and_timings(api):
    response = api.post("/v1/multimodal/describe", json={"image": b64(png(GREENISH))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"description", "finish_reason", "evidence", "models", "usage", "seconds", "method", "policy"}
    assert body["policy"] is None  # none asked for
    evidence = body["evidence"]
    assert [c["label"] for c in evidence["classes"]] == ["class0", "class1", "class2"]
    assert all(c["score"] >= 0.1 for c in evidence["classes"])
    assert [line["text"] for line in evidence["text"]] == ["GREEN 200"]
    assert evidence["text_truncated"] is False
    assert evidence["prompt"] == GREENISH_PROMPT and evidence["knowledge"] == []
    assert body["models"] == {
        "vision": "vision-model vision-weights==1/abc",
        "ocr": "ocr-model ocr==4/abc",
        "llm": "llm-model llm==3/def",
    }
    assert body["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["completion_tokens"] == len(body["description"].split())
    assert set(body["seconds"]) == {"vision", "ocr", "llm"} and all(s >= 0 for s in body["seconds"].values())
    assert "grounded" in body["method"]


def test_with_knowledge_the_graphs_facts_about_the_classes_are_in_the_prompt_with_their_sources(api):
    body = {"image": b64(png(GREENISH)), "knowledge": True}
    evidence = api.post("/v1/multimodal/describe", json=body).json()["evidence"]
    assert [k["name"] for k in evidence["knowledge"]] == ["tench.n.01", "goldfish.n.01", "great_white_shark.n.01"]
    assert evidence["prompt"].startswith(GREENISH_PROMPT + "\nKnown facts: tench, Tinca tinca: freshwater dace-like")
    assert all(source["fact"] in evidence["prompt"] for source in evidence["knowledge"])
    assert evidence["knowledge"][0]["kind_of"][:2] == ["cyprinid", "cypriniform fish"]


def test_the_description_is_written_from_the_evidence(api):
    """The fake language model echoes its last message: every word of the evidence reached the prompt."""
    body = api.post("/v1/multimodal/describe", json={"image": b64(png(GREENISH))}).json()
    assert body["description"].startswith("you said ")
    said = body["description"].split()
    assert all(word in said for word in body["evidence"]["prompt"].split())


def test_describe_takes_a_multipart_upload_with_max_tokens(api):
    response = api.post(
        "/v1/multimodal/describe", files={"image": ("a.png", png(GREENISH), "image/png")}, data={"max_tokens": "4"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["description"] == "you said Objects recognised:"
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4


def test_a_description_of_an_image_without_text_says_no_text_and_is_shown_no_text_examples(api, dataplane):
    body = api.post("/v1/multimodal/describe", json={"image": b64(png(DARK))}).json()
    assert body["evidence"]["text"] == []
    assert body["evidence"]["prompt"].endswith("Text read: no text.")
    (request,) = generated(dataplane)
    examples = [m["content"] for m in request.messages[1:-1] if m["role"] == "user"]
    assert examples and all("Text read: no text." in example for example in examples)
    assert request.messages[-1]["content"].startswith(body["evidence"]["prompt"])


def test_a_description_of_an_image_with_text_is_shown_examples_with_text(api, dataplane):
    api.post("/v1/multimodal/describe", json={"image": b64(png(GREENISH))})
    (request,) = generated(dataplane)
    examples = [m["content"] for m in request.messages[1:-1] if m["role"] == "user"]
    assert examples and all('Text read: "' in example for example in examples)
    assert request.temperature == 0.0 and request.max_tokens == 60


@pytest.mark.parametrize("max_tokens", [0, 129])
def test_describe_max_tokens_is_between_1_and_128(api, max_tokens):
    response = api.post("/v1/multimodal/describe", json={"image": b64(png(GREENISH)), "max_tokens": max_tokens})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "max_tokens"]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error_type", "loc"),
    [
        ({"json": {}}, 422, "missing", ["body", "image"]),
        ({"json": {"max_tokens": 10}}, 422, "missing", ["body", "image"]),
        ({"json": {"image": NOT_AN_IMAGE}}, 422, "invalid_image", ["body", "image"]),
        ({"files": {"image": ("a.png", base64.b64decode(NOT_AN_IMAGE), "image/png")}}, 422, "invalid_image",
         ["body", "image"]),
        ({"content": NOT_AN_IMAGE.encode(), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type",
         None),
    ],
    ids=["no-image", "no-image-with-max-tokens", "not-an-image", "not-an-image-upload", "wrong-content-type"],
)  # fmt: skip
def test_describe_refusals_say_what_and_never_echo_the_payload(api, dataplane, request_kwargs, status, error_type, loc):
    response = api.post("/v1/multimodal/describe", **request_kwargs)
    assert response.status_code == status, response.text
    (error,) = response.json()["detail"]
    assert error["type"] == error_type
    if loc is not None:
        assert error["loc"] == loc
    assert NOT_AN_IMAGE not in response.text and "secret payload" not in response.text
    assert generated(dataplane) == []


def test_describe_needs_the_ocr_model():
    response = client(FakeDataplane(unavailable={"ocr"})).post(
        "/v1/multimodal/describe", json={"image": b64(png(GREENISH))}
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["detail"][0]["type"] == "model_unavailable"


# --- OpenAI chat with images ---------------------------------------------------------------


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*content: dict, role: str = "user", **extra) -> dict:
    return {"model": "llm", "messages": [{"role": role, "content": list(content)}], "max_tokens": 64, **extra}


QUESTION = {"type": "text", "text": "What is this?"}


def test_a_chat_about_an_image_is_answered_from_its_evidence(api, dataplane):
    response = api.post("/v1/chat/completions", json=chat(QUESTION, image_part(data_url(GREENISH))))
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer.startswith("you said What is this?")
    assert "[Image 1]" in answer and "Objects recognised" in answer and '"GREEN 200"' in answer
    (request,) = generated(dataplane)
    assert request.messages[0] == {"role": "system", "content": CHAT_SYSTEM}
    assert request.messages[1] == {"role": "user", "content": "What is this?\n\n[Image 1]\n" + GREENISH_PROMPT}


def test_a_chat_about_an_image_streams(api):
    response = api.post("/v1/chat/completions", json=chat(QUESTION, image_part(data_url(GREENISH)), stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert "[Image 1]" in text and "Objects recognised" in text


def test_several_images_are_numbered_in_order_each_with_its_own_evidence(api, dataplane):
    first, second = {"type": "text", "text": "First"}, {"type": "text", "text": "then"}
    body = chat(first, image_part(data_url(DARK)), second, image_part(data_url(GREENISH)))
    assert api.post("/v1/chat/completions", json=body).status_code == 200
    (request,) = generated(dataplane)
    content = request.messages[-1]["content"]
    dark_at, green_at = content.index("[Image 1]"), content.index("[Image 2]")
    assert content.index("First") < dark_at < content.index("then") < green_at
    assert "Text read: no text." in content[dark_at:green_at]
    assert '"GREEN 200"' in content[green_at:]


def test_images_in_earlier_user_messages_are_numbered_across_the_chat(api, dataplane):
    messages = [
        {"role": "user", "content": [image_part(data_url(DARK))]},
        {"role": "assistant", "content": "A dark picture."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, image_part(data_url(GREENISH))]},
    ]
    response = api.post("/v1/chat/completions", json={"model": "llm", "messages": messages})
    assert response.status_code == 200, response.text
    (request,) = generated(dataplane)
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[1]["content"].startswith("[Image 1]\n")
    assert request.messages[2]["content"] == "A dark picture."
    assert request.messages[3]["content"].startswith("And this?\n\n[Image 2]\n")


def test_the_callers_system_message_follows_the_grounding_instructions(api, dataplane):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [QUESTION, image_part(data_url(GREENISH))]},
    ]
    assert api.post("/v1/chat/completions", json={"model": "llm", "messages": messages}).status_code == 200
    (request,) = generated(dataplane)
    assert [m["role"] for m in request.messages] == ["system", "user"]
    assert request.messages[0]["content"] == CHAT_SYSTEM + "\n\nBe brief."


def test_a_chat_without_images_is_not_grounded(api, dataplane):
    body = {"model": "llm", "messages": [{"role": "user", "content": [QUESTION]}]}
    assert api.post("/v1/chat/completions", json=body).status_code == 200
    (request,) = generated(dataplane)
    assert request.messages == [{"role": "user", "content": "What is this?"}]


def openai_error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://example.com/cat.png", "remote image URLs are not fetched"),
        ("http://example.com/cat.png", "remote image URLs are not fetched"),
        ("ftp://example.com/cat.png", "data URL"),
        ("cat.png", "data URL"),
        ("data:text/plain;base64,aGVsbG8=", "base64-encoded image"),
        ("data:image/png,rawbytes", "base64-encoded image"),
    ],
)
def test_image_urls_that_are_not_inline_base64_images_are_refused_where_they_are(api, dataplane, url, words):
    error = openai_error(api.post("/v1/chat/completions", json=chat(QUESTION, image_part(url))))
    assert words in error["message"]
    assert error["param"] == "messages.0.content.1.image_url.url"
    assert "valid string" not in error["message"]  # not the other branch of content's union
    assert generated(dataplane) == []


@pytest.mark.parametrize("role", ["system", "developer", "assistant"])
def test_images_are_accepted_in_user_messages_only(api, dataplane, role):
    error = openai_error(api.post("/v1/chat/completions", json=chat(QUESTION, image_part(data_url(GREENISH)),
                                                                    role=role)))  # fmt: skip
    assert "images are accepted in user messages only" in error["message"]
    assert error["param"] == "messages.0"
    assert generated(dataplane) == []


def test_a_chat_holds_at_most_four_images(api, dataplane):
    four = chat(QUESTION, *[image_part(data_url(DARK))] * 4)
    assert api.post("/v1/chat/completions", json=four).status_code == 200
    five = chat(QUESTION, *[image_part(data_url(DARK))] * 5)
    error = openai_error(api.post("/v1/chat/completions", json=five))
    assert "5 images; at most 4" in error["message"] and error["param"] == "messages"
    assert len(generated(dataplane)) == 1


def test_an_undecodable_image_is_named_by_where_it_is(api, dataplane):
    url = "data:image/png;base64," + NOT_AN_IMAGE
    response = api.post("/v1/chat/completions", json=chat(QUESTION, image_part(url)))
    error = openai_error(response)
    assert error["code"] == "invalid_image"
    assert error["param"] == "messages.0.content.1.image_url.url"
    assert NOT_AN_IMAGE not in response.text and "secret payload" not in response.text
    assert generated(dataplane) == []


def test_an_image_that_is_not_base64_is_named_by_where_it_is(api):
    error = openai_error(api.post("/v1/chat/completions", json=chat(QUESTION, image_part("data:image/png;base64,!!"))))
    assert error["param"] == "messages.0.content.1.image_url.url"


def test_an_image_over_the_size_limit_is_a_413(api, dataplane):
    lim = limits()
    url = "data:image/png;base64," + b64(b"\0" * (lim.max_image_bytes + 1))
    if len(url) > MAX_IMAGE_URL_CHARS or len(url) + 1024 > lim.max_request_bytes:
        pytest.skip("the schema or the body limit refuses an image just over the image limit before it is decoded")
    response = api.post("/v1/chat/completions", json=chat(QUESTION, image_part(url)))
    error = openai_error(response, 413)
    assert error["code"] == "payload_too_large"
    assert error["param"] == "messages.0.content.1.image_url.url"
    assert len(response.content) < 1024
    assert generated(dataplane) == []


def test_describe_refuses_an_image_over_the_size_limit_with_a_413(api):
    lim = limits()
    image = b64(b"\0" * (lim.max_image_bytes + 1))
    if len(image) + 1024 > lim.max_request_bytes:
        pytest.skip("the body limit refuses an image just over the image limit before it is decoded")
    response = api.post("/v1/multimodal/describe", json={"image": image})
    assert response.status_code == 413
    (error,) = response.json()["detail"]
    assert error["type"] == "payload_too_large" and error["loc"] == ["body", "image"]
    assert len(response.content) < 1024
