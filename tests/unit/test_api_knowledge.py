"""Knowledge through the API, with a fake dataplane: concept roll-ups on /v1/vision/classify."""

import pytest

from tests.unit.fake_dataplane import FakeDataplane, client
from tests.unit.test_api_v1 import b64, png

# png(13) is fake class 3 (ImageNet's tiger shark), then 4 (hammerhead), 5, 6 (rays), 7 (cock), each half the last.
CLASSIFY = {"image": b64(png(13)), "top_k": 5}


@pytest.fixture
def dataplane() -> FakeDataplane:
    return FakeDataplane()


def test_concepts_get_the_probability_of_the_classes_below_them(dataplane):
    body = CLASSIFY | {"concepts": ["shark", "fish", "n01503061", "entity.n.01", "vehicle"]}
    response = client(dataplane).post("/v1/vision/classify", json=body)
    assert response.status_code == 200, response.text
    concepts = response.json()["concepts"]
    assert [c["concept"] for c in concepts] == body["concepts"]  # in the order asked
    assert [c["name"] for c in concepts] == ["shark.n.01", "fish.n.01", "bird.n.01", "entity.n.01", "vehicle.n.01"]
    probabilities = {c["name"]: c["probability"] for c in concepts}
    assert probabilities == pytest.approx(
        {"shark.n.01": 0.75, "fish.n.01": 0.9375, "bird.n.01": 0.03125, "entity.n.01": 0.96875, "vehicle.n.01": 0.0}
    )
    assert concepts[1]["definition"].startswith("any of various mostly cold-blooded aquatic vertebrates")
    assert concepts[3]["classes"] == 1000 and concepts[2]["synset"] == "n01503061"


def test_without_concepts_the_response_has_none(dataplane):
    assert client(dataplane).post("/v1/vision/classify", json=CLASSIFY).json()["concepts"] is None


def test_an_unknown_concept_is_refused_with_close_matches_before_any_work(dataplane):
    response = client(dataplane).post("/v1/vision/classify", json=CLASSIFY | {"concepts": ["dog", "vehical"]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "concepts", 1] and error["type"] == "invalid_input"
    assert "close matches: vehicle" in error["msg"] and "vehical" not in error["msg"]
    assert dataplane.calls == []  # the image was not classified


@pytest.mark.parametrize(
    ("concepts", "problem"),
    [([], "at least 1"), (["dog", "dog"], "distinct"), ([f"c{i}" for i in range(17)], "at most 16"), ([" "], "match")],
)
def test_concept_lists_are_bounded(dataplane, concepts, problem):
    response = client(dataplane).post("/v1/vision/classify", json=CLASSIFY | {"concepts": concepts})
    assert response.status_code == 422
    assert problem in response.json()["detail"][0]["msg"]


def test_a_form_sends_concepts_as_repeated_fields(dataplane):
    form, files = {"top_k": "5", "concepts": ["fish", "bird"]}, {"image": ("x.png", png(13), "image/png")}
    response = client(dataplane).post("/v1/vision/classify", data=form, files=files)
    assert response.status_code == 200, response.text
    assert [c["probability"] for c in response.json()["concepts"]] == pytest.approx([0.9375, 0.03125])
