"""The Open Inference Protocol against the deployed app, through Triton's own HTTP client."""

import base64

import numpy as np
import pytest
import skimage.data
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import encode
from tests.integration.test_api import CAT_CLASSES

MODELS = ("vision", "text", "fusion")


@pytest.fixture(scope="module")
def oip(app_url):
    client = triton.InferenceServerClient(url=app_url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def images_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def texts_input(name: str, texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def labels(result) -> list[list[str]]:
    return [
        [label.decode() if isinstance(label, bytes) else label for label in row] for row in result.as_numpy("labels")
    ]


def test_server_metadata_health_and_readiness(oip):
    assert oip.is_server_live() and oip.is_server_ready()
    metadata = oip.get_server_metadata()
    assert metadata["name"] == "maas-cluster" and "binary_tensor_data" in metadata["extensions"]
    assert all(oip.is_model_ready(model) for model in MODELS)


def test_model_metadata_describes_the_tensors(oip, client):
    versions = {m["id"]: m["version"] for m in client.get("/v1/models").json()["data"]}
    vision = oip.get_model_metadata("vision")
    assert vision["versions"] == [versions["vision"]]
    assert vision["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in vision["outputs"]}
    assert outputs == {
        "labels": ("BYTES", [-1, -1]),
        "probabilities": ("FP32", [-1, -1]),
        "embedding": ("FP32", [-1, 1280]),
    }
    text = oip.get_model_metadata("text")
    assert text["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert oip.get_model_metadata("vision", model_version=versions["vision"])["name"] == "vision"
    assert oip.is_model_ready("text", model_version=versions["text"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_chelsea_is_a_cat_and_coffee_is_espresso(oip, chelsea_jpeg, coffee_jpeg, binary):
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("labels", "probabilities")]
    result = oip.infer("vision", [images_input([chelsea_jpeg], binary)], outputs=outputs, parameters={"top_k": 3})
    assert CAT_CLASSES & set(labels(result)[0])
    assert result.as_numpy("probabilities").shape == (1, 3)
    coffee = oip.infer("vision", [images_input([coffee_jpeg], binary)], outputs=outputs)
    assert labels(coffee)[0][0] == "espresso"


def test_a_batch_of_three_equals_three_single_calls(oip, chelsea_jpeg, coffee_jpeg):
    images = [chelsea_jpeg, coffee_jpeg, encode(skimage.data.astronaut())]
    outputs = [triton.InferRequestedOutput(name) for name in ("labels", "probabilities", "embedding")]
    batch = oip.infer("vision", [images_input(images, True)], outputs=outputs)
    assert batch.as_numpy("embedding").shape == (3, 1280)
    for index, image in enumerate(images):
        single = oip.infer("vision", [images_input([image], True)], outputs=outputs)
        assert labels(single)[0] == labels(batch)[index]
        np.testing.assert_allclose(
            single.as_numpy("probabilities")[0], batch.as_numpy("probabilities")[index], atol=1e-5
        )
        np.testing.assert_allclose(single.as_numpy("embedding")[0], batch.as_numpy("embedding")[index], atol=1e-4)


def test_text_embeddings_equal_the_v1_route(oip, client):
    texts = ["a cat sleeps on the sofa", "quarterly invoice overdue"]
    embeddings = oip.infer("text", [texts_input("text", texts)]).as_numpy("embedding")
    v1 = client.post("/v1/text/embed", json={"texts": texts}).json()["embeddings"]
    assert embeddings.shape == (2, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, np.array(v1), atol=1e-5)


def test_fusion_scores_labels_against_an_image_and_a_text(oip, chelsea_jpeg):
    candidates = ["a photo of a cat", "a cup of coffee", "a rocket launch"]
    inputs = [images_input([chelsea_jpeg], True), texts_input("text", ["my pet"]), texts_input("labels", candidates)]
    result = oip.infer("fusion", inputs)
    scores = result.as_numpy("scores")
    assert scores.shape == (1, 3) and candidates[int(np.argmax(scores[0]))] == "a photo of a cat"
    assert result.as_numpy("vision_scores").shape == (1, 3) and result.as_numpy("text_scores").shape == (1, 3)


@pytest.mark.parametrize(
    ("call", "status", "words"),
    [
        (lambda oip, img: oip.infer("nothing", [img]), "404", "no model named 'nothing'"),
        (lambda oip, img: oip.infer("vision", [img], model_version="7"), "404", "no version '7'"),
        (lambda oip, img: oip.get_model_metadata("vision", model_version="7"), "404", "no version '7'"),
        (lambda oip, img: oip.infer("text", [img]), "400", "no input 'image'"),
        (lambda oip, img: oip.infer("vision", [texts_input("image", ["not an image"])]), "400", "image"),
        (
            lambda oip, img: oip.infer("vision", [img], outputs=[triton.InferRequestedOutput("logits")]),
            "400",
            "no output 'logits'",
        ),
    ],
)
def test_errors_reach_the_client_with_status_and_message(oip, coffee_jpeg, call, status, words):
    with pytest.raises(InferenceServerException) as error:
        call(oip, images_input([coffee_jpeg], True))
    assert error.value.status() == status and words in error.value.message()


def test_wrong_datatype_and_shape_are_400s(oip):
    wrong_type = triton.InferInput("image", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(InferenceServerException, match="datatype BYTES, not FP32"):
        oip.infer("vision", [wrong_type])
    wrong_shape = triton.InferInput("text", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([["a", "b"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"shape \[N\]"):
        oip.infer("text", [wrong_shape])
