"""Batched results equal single-request results, and batches really form."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image
from ray import serve

from deployments.contracts import MAX_GROUP_SIZE, TextEmbeddings
from deployments.errors import ConfigError, InvalidInput
from deployments.imaging import prepare
from pipelines.multimodal import build_app
from tests.conftest import b64, encode
from tests.integration.conftest import APP
from tests.serving import replica_infos, serve_status

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]


@pytest.fixture(scope="module")
def vision(app_url):
    return serve.get_deployment_handle("VisionClassifier", app_name=APP)


@pytest.fixture(scope="module")
def text(app_url):
    return serve.get_deployment_handle("TextEncoder", app_name=APP)


def test_vision_batches_equal_single_requests(vision):
    spec, _ = vision.geometry.remote().result()
    images = [prepare(Image.fromarray(getattr(skimage.data, name)()), spec) for name in PHOTOS]
    singles = [vision.classify.remote(image, 5).result() for image in images]

    responses = [vision.classify.remote(images[i % len(images)], 5) for i in range(32)]
    batched = [r.result() for r in responses]

    assert max(r.batch_size for r in batched) > 1, "concurrent requests never shared a batch"
    for i, result in enumerate(batched):
        single = singles[i % len(images)]
        assert [label for label, _ in result.labels] == [label for label, _ in single.labels]
        np.testing.assert_allclose(result.probs, single.probs, atol=1e-5)


def test_a_group_call_answers_each_call_as_its_own_handle_call_would(vision):
    spec, _ = vision.geometry.remote().result()
    images = [prepare(Image.fromarray(getattr(skimage.data, name)()), spec) for name in PHOTOS]
    singles = [vision.classify.remote(image, 3).result() for image in images]
    grouped = vision.call_group.remote("classify", [(image, 3, False) for image in images]).result()
    assert [[label for label, _ in r.labels] for r in grouped] == [[label for label, _ in r.labels] for r in singles]
    with pytest.raises(InvalidInput, match=f"at most {MAX_GROUP_SIZE} calls, got {MAX_GROUP_SIZE + 1}"):
        vision.call_group.remote("classify", [(images[0][:1, :1], 1, False)] * (MAX_GROUP_SIZE + 1)).result()
    with pytest.raises(InvalidInput, match=r"'reconfigure' cannot be called in a group; these can: \['classify'\]"):
        vision.call_group.remote("reconfigure", [({},)]).result()


def test_a_refused_call_in_a_group_gets_its_own_error_and_the_others_their_answers(app_url):
    fusion = serve.get_deployment_handle("FusionScorer", app_name=APP)
    embeddings = TextEmbeddings(vectors=np.eye(3, 384, dtype=np.float32), model="m", version="v")
    # Text only: two labels' embeddings, then the text's, equal to the first label's.
    calls = [(None, embeddings, True), (None, embeddings, True, 0.0, 0.0)]  # the second one's weights sum to 0
    fused, refused = fusion.call_group.remote("fuse", calls).result()
    assert isinstance(refused, InvalidInput) and "sum to 0" in str(refused)
    assert int(np.argmax(fused.fused)) == 0


def test_concurrent_vision_requests_each_get_their_own_answer(client):
    """The ingress sends concurrent requests' images to the vision model together (pipelines/grouping.py)."""
    payloads = [{"image": b64(encode(getattr(skimage.data, name)(), quality=90)), "top_k": 3} for name in PHOTOS]
    singles = [client.post("/v1/vision/classify", json=p).json()["labels"][0]["label"] for p in payloads]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda i: client.post("/v1/vision/classify", json=payloads[i % 4]), range(32)))
    assert [r.status_code for r in results] == [200] * 32
    assert [r.json()["labels"][0]["label"] for r in results] == [singles[i % 4] for i in range(32)]


def test_clients_that_hang_up_fail_none_of_the_requests_grouped_with_theirs(app_url):
    """Serve cancels the model calls of a request whose client goes away; a grouped call carries other
    requests' images too (pipelines/grouping.py), and those must still be answered."""
    payload = {"image": b64(encode(skimage.data.chelsea(), quality=90)), "top_k": 1}
    url = f"{app_url}/v1/vision/classify"

    async def load() -> tuple[list[int], int]:
        async with httpx.AsyncClient(timeout=60) as patient, httpx.AsyncClient(timeout=0.05) as impatient:

            async def stays() -> list[int]:
                return [(await patient.post(url, json=payload)).status_code for _ in range(6)]

            async def hangs_up() -> int:
                gone = 0
                for _ in range(10):
                    try:
                        await impatient.post(url, json=payload)
                    except httpx.TimeoutException:
                        gone += 1
                return gone

            results = await asyncio.gather(*(stays() for _ in range(8)), *(hangs_up() for _ in range(4)))
        return [status for statuses in results[:8] for status in statuses], sum(results[8:])

    statuses, gone = asyncio.run(load())
    assert gone > 0, "no client hung up: the test did not test anything"
    assert statuses == [200] * 48


def test_text_batches_equal_single_requests(text):
    sentences = ["a kitten on a rug", "stock markets fell sharply on Tuesday", "hi", "the espresso was bitter"]
    singles = [text.embed.remote([s]).result().vectors[0] for s in sentences]
    together = text.embed.remote(sentences).result().vectors  # one request, one shared batch
    concurrent = [text.embed.remote([sentences[i % 4]]) for i in range(32)]
    for i, response in enumerate(concurrent):
        np.testing.assert_allclose(response.result().vectors[0], singles[i % 4], atol=1e-5)
    np.testing.assert_allclose(together, np.stack(singles), atol=1e-5)


def text_replicas() -> int:
    return serve_status().applications[APP].deployments["TextEncoder"].replica_states["RUNNING"]


def label_cache_hits() -> int:
    """Label-cache hits of all text replicas (each keeps its own cache)."""
    infos = replica_infos("TextEncoder", text_replicas())
    return sum(info["details"]["label_cache"]["hits"] for info in infos.values())


def test_label_embeddings_come_from_the_cache_the_second_time(text):
    labels = ["a photo of a lighthouse", "a plate of dumplings", "a mountain bike"]
    calls = 6
    before = label_cache_hits()
    answers = [text.embed_labels.remote(labels, "fresh text").result().vectors for _ in range(calls)]
    replicas = text_replicas()
    # Each replica embeds a label once; every later request for it, on that replica, is a hit.
    assert label_cache_hits() - before >= len(labels) * (calls - replicas)
    first = answers[0]
    for second in answers[1:]:  # from either replica, from its cache or not
        np.testing.assert_allclose(first, second, atol=1e-5)
    np.testing.assert_allclose(first[:3], text.embed.remote(labels).result().vectors, atol=1e-5)


def test_concurrent_http_requests_get_the_same_answers(client):
    payloads = [
        {"image": b64(encode(getattr(skimage.data, name)(), quality=90)), "labels": ["a cat", "a coffee", "a rocket"]}
        for name in ("chelsea", "coffee", "rocket")
    ]
    singles = [client.post("/v1/multimodal/analyze", json=p).json() for p in payloads]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda i: client.post("/v1/multimodal/analyze", json=payloads[i % 3]), range(24)))
    for i, response in enumerate(results):
        assert response.status_code == 200
        expected = singles[i % 3]
        got = response.json()
        assert [e["label"] for e in got["fused"]] == [e["label"] for e in expected["fused"]]
        for a, b in zip(got["fused"], expected["fused"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_gpu_profile_refuses_a_cluster_without_gpus(app_url):
    with pytest.raises(ConfigError, match="the Ray cluster has none"):
        build_app({"require_gpus": True})
