"""No retention: a canary text and a canary image sent through every route appear in no log and no metric.

Every log file of the Ray session (Ray's own, every replica's, the proxy's, the audit trail) and every node's
metrics exposition is searched for the canary text and for pieces of the image, base64 and raw.
"""

import base64
import io
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from tests import serving

CANARY = f"zqcanary{uuid.uuid4().hex}"
IMAGE_B64_SLICE = slice(400, 460)
IMAGE_BYTES_SLICE = slice(300, 332)


@pytest.fixture(scope="module")
def canary_png() -> bytes:
    noise = np.random.default_rng(int(CANARY[-8:], 16)).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG")
    return out.getvalue()


def sends(image: str) -> list[tuple[str, dict]]:
    """(path, JSON body) of every route that takes data; bodies that are refused (4xx) included."""
    words = f"Please file {CANARY} under finance"
    data_uri = f"data:image/png;base64,{image}"
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [words]}
    return [
        ("/v1/vision/classify", {"image": image}),
        ("/v1/vision/ocr", {"image": image}),
        ("/v1/vision/explain", {"image": image, "heatmap": False}),
        ("/v1/multimodal/describe", {"image": image, "max_tokens": 4}),
        ("/v1/audio/speech", {"model": "tts", "voice": "joe", "input": words, "response_format": "wav"}),
        ("/v1/multimodal/ask", {"text": words, "image": image, "max_tokens": 4}),
        ("/v1/multimodal/analyze", {"image": image, "text": words, "labels": [CANARY, "finance"]}),
        ("/v1/text/embed", {"texts": [words]}),
        ("/v1/text/classify", {"text": words, "labels": [CANARY, "sports"]}),
        ("/v1/text/explain", {"text": words, "labels": ["finance", "sports"]}),
        ("/v1/chat/completions", {"model": "llm", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": words}, {"type": "image_url", "image_url": {"url": data_uri}}]}]}),
        ("/v1/completions", {"model": "llm", "prompt": words, "max_tokens": 4}),
        ("/v1/embeddings", {"model": "text", "input": words}),
        ("/v1/rerank", {"model": "text", "query": words, "documents": [words, "sports"], "return_documents": True}),
        ("/v1/score", {"model": "text", "text_1": words, "text_2": [words, "sports"]}),
        ("/v2/models/text/infer", {"inputs": [tensor]}),
        ("/v2/models/vision/infer", {"inputs": [{**tensor, "name": "image", "data": [image]}]}),
        ("/v2/models/text/explain", {"inputs": [tensor, {**tensor, "name": "labels", "shape": [2],
                                                         "data": ["finance", CANARY]}]}),
        # Refused requests: their errors and logs must not carry the input either.
        ("/v1/vision/classify", {"image": CANARY}),
        ("/v1/text/classify", {"text": words, "labels": [CANARY]}),
        ("/v1/chat/completions", {"model": CANARY, "messages": [{"role": "user", "content": words}]}),
        ("/v1/chat/completions", {"model": "llm", "messages": [{"role": CANARY, "content": words}]}),
        ("/v2/models/text/infer", {"inputs": [{**tensor, "datatype": CANARY}]}),
        ("/v1/audio/speech", {"model": "tts", "voice": CANARY, "input": words}),
    ]  # fmt: skip


def test_a_canary_sent_through_every_route_is_in_no_log_and_no_metric(client, canary_png):
    image = base64.b64encode(canary_png).decode()
    statuses = {}
    for path, body in sends(image):
        answer = client.post(path, json=body)
        statuses.setdefault(path, []).append(answer.status_code)
        if answer.status_code >= 400 and body.get("model") != CANARY:  # a model's name is echoed, as OpenAI does
            assert CANARY not in answer.text, (path, answer.text)
    multipart = client.post("/v1/vision/classify", files={"image": ("canary.png", canary_png, "image/png")})
    assert multipart.status_code == 200
    assert all(codes[0] == 200 for codes in statuses.values()), statuses  # each route served the canary once
    time.sleep(2)  # let every process flush its log lines

    needles = [CANARY.encode(), image[IMAGE_B64_SLICE].encode(), canary_png[IMAGE_BYTES_SLICE]]
    logs = serving.session_logs_dir()
    searched, found, routes_seen = 0, [], False
    for path in logs.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            searched += 1
            found += [f"{path.relative_to(logs)}: needle {n}" for n, needle in enumerate(needles) if needle in content]
            routes_seen |= b"/v1/text/classify" in content  # the search does see what the requests logged
    assert searched > 20 and routes_seen and not found, found
    audit = list((logs / "serve").glob("maas-audit-*.jsonl"))
    assert audit, "no audit trail was written"
    exposition = serving.metrics_exposition()
    assert "ray_maas_http_requests_total" in exposition
    assert not [n for n, needle in enumerate(needles) if needle.decode("latin-1") in exposition]
