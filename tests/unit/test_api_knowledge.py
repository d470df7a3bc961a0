"""Knowledge through the API, with a fake dataplane: concept roll-ups on /v1/vision/classify."""

import pytest

from knowledge.rules import compile_policies, parse_policies
from tests.unit import fake_dataplane as fake
from tests.unit import test_api_images as images
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


# --- policies on the routes -------------------------------------------------------------------------

POLICIES = {
    "fish-check": {
        "concepts": ["fish", "shark"],
        "rules": [
            {"id": "no-sharks", "when": 'concepts["shark"] > 0.9', "action": "block", "priority": 10},
            {"id": "fishy", "when": 'concepts["fish"] > 0.5', "action": "flag"},
            {"id": "to-review", "when": "top_label.score < 0.9", "action": {"route": "review"}},
            {"id": "hide-green", "when": "true", "action": {"mask": "GREEN"}},
        ],
    }
}


@pytest.fixture
def judged() -> FakeDataplane:
    dataplane = FakeDataplane()
    dataplane.policies = compile_policies(parse_policies(POLICIES), time_rules=False)
    return dataplane


def test_analyze_returns_the_policy_decision_with_its_trace(judged):
    body = {"image": b64(png(13)), "labels": ["a fish", "a car"], "policy": "fish-check"}
    response = client(judged).post("/v1/multimodal/analyze", json=body)
    assert response.status_code == 200, response.text
    decision = response.json()["policy"]
    assert decision["policy"] == "fish-check" and decision["decision"] == "allow"
    assert decision["flags"] == ["fishy"] and decision["route"] == "review"
    fired = {f["rule"]: f for f in decision["fired"]}
    assert fired["fishy"]["facts"]["concepts"] == pytest.approx({"fish": 0.9375, "shark": 0.75})
    assert decision["evaluated"] == 4 and decision["errors"] == []


def test_a_block_is_a_403_that_names_the_rule_and_not_its_condition(judged):
    # Fish are 0.9375 of png(13)'s probability: over the block rule's 0.9 once it counts every fish as a shark.
    body = {"image": b64(png(13)), "top_k": 5, "labels": ["x"], "policy": "fish-check"}
    judged.policies["fish-check"].concepts["shark"] = judged.knowledge.resolve("fish").id  # any fish is a "shark"
    response = client(judged).post("/v1/multimodal/analyze", json=body)
    assert response.status_code == 403, response.text
    (error,) = response.json()["detail"]
    assert error == {"loc": ["body", "policy"], "msg": "refused by rule 'no-sharks' of policy 'fish-check'",
                     "type": "policy_blocked"}  # fmt: skip


def test_describe_masks_what_the_policy_masks(judged):
    green = b64(images.png(images.GREENISH))  # the fake OCR reads "GREEN 200" in it
    response = client(judged).post("/v1/multimodal/describe", json={"image": green, "policy": "fish-check"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["policy"]["masked"] >= 1
    assert "GREEN" not in body["description"] and "GREEN" not in body["evidence"]["prompt"]
    assert [line["text"] for line in body["evidence"]["text"]] == ["[masked] 200"]


def test_an_unknown_policy_is_refused_before_any_work(judged):
    response = client(judged).post("/v1/multimodal/analyze", json={"text": "x", "labels": ["a"], "policy": "nope"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == "unknown policy; the policies are: fish-check"
    assert judged.calls == []


def test_the_policies_are_listed_without_their_conditions(judged):
    judged.policy_update_error = "policy 'x': rule 'y': the condition does not parse"
    body = client(judged).get("/v1/policies").json()
    assert body["update_error"] == judged.policy_update_error
    (policy,) = body["policies"]
    assert policy["name"] == "fish-check" and policy["concepts"] == ["fish", "shark"]
    assert [(r["id"], r["action"], r["priority"]) for r in policy["rules"]] == [
        ("no-sharks", "block", 10), ("fishy", "flag", 0), ("to-review", "route", 0), ("hide-green", "mask", 0)
    ]  # fmt: skip
    assert "concepts[" not in str(body)


# --- knowledge and policies in chat ------------------------------------------------------------------


def chat(content, **extra) -> dict:
    return {"model": "llm", "messages": [{"role": "user", "content": content}], "max_tokens": 60} | extra


def test_a_chat_with_knowledge_gives_the_model_the_facts_about_the_concepts_named(judged):
    response = client(judged).post("/v1/chat/completions", json=chat("What is a dingo?", knowledge=True))
    assert response.status_code == 200, response.text
    (source,) = response.json()["knowledge"]
    assert source["name"] == "dingo.n.01" and "Australia" in source["definition"]
    (request,) = images.generated(judged)
    system = request.messages[0]
    assert system["role"] == "system" and source["fact"] in system["content"]


def test_without_knowledge_a_chat_is_plain(judged):
    body = client(judged).post("/v1/chat/completions", json=chat("What is a dingo?")).json()
    assert body["knowledge"] is None and body["policy"] is None
    (request,) = images.generated(judged)
    assert [m["role"] for m in request.messages] == ["user"]


def test_a_chat_about_an_image_with_knowledge_returns_the_class_facts_as_sources(judged):
    content = [{"type": "text", "text": "What is this?"}, images.image_part(images.data_url(images.GREENISH))]
    body = client(judged).post("/v1/chat/completions", json=chat(content, knowledge=True)).json()
    assert [s["name"] for s in body["knowledge"]] == ["tench.n.01", "goldfish.n.01", "great_white_shark.n.01"]


def test_a_chat_answer_is_checked_by_its_policy_and_masked(judged):
    content = [{"type": "text", "text": "Read it"}, images.image_part(images.data_url(images.GREENISH))]
    body = client(judged).post("/v1/chat/completions", json=chat(content, policy="fish-check")).json()
    assert body["policy"]["policy"] == "fish-check" and body["policy"]["masked"] >= 1
    assert "GREEN" not in body["choices"][0]["message"]["content"]
    (request,) = images.generated(judged)
    assert all("GREEN" not in message["content"] for message in request.messages)  # masked before the model read


def test_a_streamed_chat_with_a_policy_is_sent_once_checked_with_the_decision_last(judged):
    response = client(judged).post("/v1/chat/completions", json=chat("tell me", policy="fish-check", stream=True))
    assert response.status_code == 200
    payloads = fake.events(response)
    assert payloads[-1] == "[DONE]"
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1] if p["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[1]["content"] == "you said tell me"
    assert payloads[-2]["policy"]["policy"] == "fish-check" and payloads[-2]["choices"][0]["finish_reason"]


def test_a_chat_blocked_by_its_policy_is_a_403_even_when_streamed(judged):
    judged.policies["fish-check"].concepts["shark"] = judged.knowledge.resolve("fish").id
    content = [{"type": "text", "text": "What is it?"}, images.image_part(images.data_url((13, 200, 10)))]
    for stream in (False, True):
        response = client(judged).post("/v1/chat/completions", json=chat(content, policy="fish-check", stream=stream))
        assert response.status_code == 403, response.text
        assert "no-sharks" in response.text
