"""Explanations against the running app: saliency on real photographs, word contributions, the exact
decomposition of fused scores, the Open Inference Protocol's explain routes, bad inputs and the time budget."""

import base64
import io
import re
import time

import numpy as np
import pytest
from PIL import Image
from skimage import data

from tests.conftest import b64, encode
from tests.integration.conftest import deploy, shipped_config

# The cat on a brick wall: chelsea (451 x 300) scaled to 240 x 160 and pasted at (30, 40) of a 448 x 448 wall.
# The classifier's centre crop holds cat and wall, so where the map's mass lies can be measured (chelsea's own
# crop is all cat).
CAT_BOX = (30, 40, 270, 200)  # left, top, right, bottom in the upload's pixels


@pytest.fixture(scope="module")
def cat_on_a_wall() -> bytes:
    wall = np.asarray(Image.fromarray(data.brick()).resize((448, 448)))
    canvas = np.stack([wall] * 3, axis=-1).copy()
    left, top, right, bottom = CAT_BOX
    canvas[top:bottom, left:right] = np.asarray(Image.fromarray(data.chelsea()).resize((right - left, bottom - top)))
    return encode(canvas, "PNG")


def explain(client, image: bytes, **body):
    return client.post("/v1/vision/explain", json={"image": b64(image), **body})


def detail(response) -> str:
    return response.json()["detail"][0]["msg"]


def test_the_saliency_of_the_cat_class_lies_on_the_cat(client, cat_on_a_wall):
    response = explain(client, cat_on_a_wall, label="Egyptian cat", grid=28)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["explained"]["label"] == "Egyptian cat" and result["explained"]["index"] == 285
    assert result["method"] == "gradcam" and result["parameters"] == {"layer": "features"}
    cells = np.array(result["grid"])
    assert cells.shape == (28, 28) and cells.sum() == pytest.approx(1.0, abs=1e-4)
    # Which cells have their centre on the cat, in the upload's pixels.
    x, y, width, _ = result["region"]
    assert (x, y, width) == (28.0, 28.0, 392.0)  # 448 px resized to 256, centre 224: the middle 392 px
    centres = x + (np.arange(28) + 0.5) * width / 28
    left, top, right, bottom = CAT_BOX
    on_cat = ((centres >= top) & (centres < bottom))[:, None] & ((centres >= left) & (centres < right))[None, :]
    # Measured here: 3.6 times as much saliency per cell on the cat as on the wall.
    assert cells[on_cat].mean() > 2 * cells[~on_cat].mean()
    heatmap = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
    assert (heatmap.format, heatmap.size) == ("PNG", (224, 224))


def test_integrated_gradients_explains_the_top_class_with_its_steps(client, chelsea_jpeg):
    response = explain(client, chelsea_jpeg, method="integrated_gradients", steps=4, grid=7, heatmap=False)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["explained"]["label"] == "Egyptian cat"
    assert result["parameters"]["steps"] == 4 and result["heatmap_png"] is None
    assert np.array(result["grid"]).shape == (7, 7)


def test_a_multipart_upload_is_explained_too(client, chelsea_jpeg):
    response = client.post(
        "/v1/vision/explain", files={"image": ("cat.jpg", chelsea_jpeg, "image/jpeg")}, data={"label": "tabby"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["explained"]["label"] == "tabby"


def test_a_finance_word_contributes_most_to_the_finance_label(client):
    response = client.post(
        "/v1/text/explain",
        json={"text": "The central bank raised interest rates and the stock market fell sharply",
              "labels": ["finance", "sports", "weather"]},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["label"] == "finance"
    assert result["ranking"][0] in {"bank", "interest", "rates", "stock", "market"}
    assert [w["word"] for w in result["words"]][:3] == ["The", "central", "bank"]
    assert result["method"] == "occlusion"


def test_a_named_label_is_explained_and_its_words_drive_it(client):
    response = client.post(
        "/v1/text/explain",
        json={"text": "The striker scored twice as the bank posted record profits",
              "labels": ["finance", "sports"], "label": "sports"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["label"] == "sports"
    contribution = {w["word"]: w["contribution"] for w in result["words"]}
    assert result["ranking"][0] in {"striker", "scored", "twice"}  # the sports half of the sentence
    assert contribution["bank"] < 0 and contribution["profits"] < 0, contribution  # they speak for finance


def test_a_fused_score_is_exactly_the_sum_of_its_parts(client, chelsea_jpeg):
    labels = ["a cat", "a dog", "a sports car"]
    response = client.post(
        "/v1/multimodal/analyze",
        json={"image": b64(chelsea_jpeg), "text": "a small pet asleep", "labels": labels, "explain": True,
              "vision_weight": 0.7, "text_weight": 0.3},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    result = response.json()
    explained = result["explanation"]
    assert explained["weights"] == {"vision": 0.7, "text": 0.3}
    assert explained["classes"][0]["label"] == "Egyptian cat"
    assert sum(c["weight"] for c in explained["classes"]) == pytest.approx(1.0, abs=1e-6)
    fused = {item["label"]: item["score"] for item in result["fused"]}
    vision = {item["label"]: item["score"] for item in result["vision"]["labels"]}
    temperature = explained["temperature"]
    similarities = np.array([row["vision"]["similarity"] for row in explained["labels"]])
    softmax = np.exp(similarities / temperature) / np.exp(similarities / temperature).sum()
    for row, expected in zip(explained["labels"], softmax):
        assert abs(sum(row["parts"].values()) - fused[row["label"]]) < 1e-5
        assert abs(row["parts"]["vision"] - 0.7 * vision[row["label"]]) < 1e-5
        assert abs(sum(c["contribution"] for c in row["vision"]["classes"]) - row["vision"]["similarity"]) < 1e-5
        assert abs(expected - row["vision"]["score"]) < 1e-5
    assert explained["labels"][0]["label"] == "a cat"
    assert explained["labels"][0]["vision"]["classes"][0]["label"] == "Egyptian cat"


# --- the Open Inference Protocol -----------------------------------------------------------


def tensor(name: str, values: list[str]) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [len(values)], "data": values}


def outputs(response) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def test_the_v2_explain_routes_explain_each_model(client, chelsea_jpeg):
    image = client.post("/v2/models/vision/explain",
                        json={"inputs": [tensor("image", [b64(chelsea_jpeg)])], "parameters": {"grid": 4}})  # fmt: skip
    assert image.status_code == 200, image.text
    found = outputs(image)
    assert found["label"].tolist() == ["Egyptian cat"] and found["saliency"].shape == (1, 4, 4)
    assert found["saliency"].sum() == pytest.approx(1.0, abs=1e-4)

    text = client.post(
        "/v2/models/text/explain",
        json={
            "inputs": [
                tensor("text", ["stocks fell sharply", "the team won the match"]),
                tensor("labels", ["finance", "sports"]),
            ]
        },
    )
    assert text.status_code == 200, text.text
    found = outputs(text)
    assert found["label"].tolist() == ["finance", "sports"]
    assert found["words"].shape == (2, 5) and found["words"][0].tolist() == ["stocks", "fell", "sharply", "", ""]

    fusion = client.post(
        "/v2/models/fusion/explain",
        json={"inputs": [tensor("image", [b64(chelsea_jpeg)]), tensor("labels", ["a cat", "a car"])]},
    )
    assert fusion.status_code == 200, fusion.text
    found = outputs(fusion)
    np.testing.assert_allclose(found["class_contributions"].sum(axis=1), found["vision_similarity"], atol=1e-5)
    assert found["classes"][0][0] == "Egyptian cat"


def test_a_model_without_an_explainer_is_a_404_naming_those_with_one(client):
    response = client.post("/v2/models/ocr/explain", json={"inputs": []})
    assert response.status_code == 404
    assert response.json() == {"error": "model 'ocr' is not served over the Open Inference Protocol"}


# --- bad inputs and the budget ----------------------------------------------------------------


def test_an_unknown_class_is_a_422_with_close_matches(client, chelsea_jpeg):
    response = explain(client, chelsea_jpeg, label="egyptian kat")
    assert response.status_code == 422
    assert "close: 'Egyptian cat'" in detail(response)
    assert response.json()["detail"][0]["loc"] == ["body", "label"]


def test_too_many_steps_are_a_422_before_any_work(client, chelsea_jpeg):
    response = explain(client, chelsea_jpeg, method="integrated_gradients", steps=65)
    assert response.status_code == 422
    assert detail(response) == "Input should be less than or equal to 64"


def test_a_too_large_image_is_a_413(client, pixel_bomb_png):
    response = explain(client, pixel_bomb_png)
    assert response.status_code == 413
    assert "the limit is 40000000 pixels" in detail(response)


def test_a_text_of_too_many_words_and_a_label_not_offered_are_422s(client):
    long = client.post("/v1/text/explain", json={"text": "word " * 65, "labels": ["a", "b"]})
    assert long.status_code == 422 and detail(long) == "the text has 65 words; explanations take at most 64"
    stranger = client.post("/v1/text/explain", json={"text": "stocks fell", "labels": ["a", "b"], "label": "c"})
    assert stranger.status_code == 422 and detail(stranger) == "label must be one of labels"


def explainer_budgets(client) -> set[float]:
    """The budget of each explainer replica that answers (several asks: two replicas)."""
    seen = set()
    for _ in range(8):
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        seen.add(models["explainer"]["details"]["budget_s"])
    return seen


def test_an_explanation_over_its_budget_is_a_504_and_the_explainer_recovers(client, chelsea_jpeg, tmp_path):
    config = shipped_config()
    (explainer,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Explainer"]
    explainer["user_config"]["budget_s"] = 0.2
    try:
        deploy(config, tmp_path / "tight.yaml")
        deadline = time.monotonic() + 60
        while explainer_budgets(client) != {0.2} and time.monotonic() < deadline:
            time.sleep(0.5)
        response = explain(client, chelsea_jpeg, method="integrated_gradients", steps=64, heatmap=False)
        assert response.status_code == 504, response.text
        stopped = re.fullmatch(
            r"the explanation took longer than its budget of 0.2 s; it was stopped after (\d) of its 9 forward passes",
            detail(response),
        )
        assert stopped, detail(response)
        assert int(stopped.group(1)) < 9  # stopped at the budget, not run to the end
        assert response.json()["detail"][0]["type"] == "explanation_timeout"
    finally:
        deploy(shipped_config(), tmp_path / "shipped.yaml")
    assert explain(client, chelsea_jpeg, heatmap=False).status_code == 200
