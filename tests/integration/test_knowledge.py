"""Knowledge with the models, against the deployed app: concept roll-ups on real photographs, the shipped
policies on real model outputs, and policies changed live."""

import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from tests.conftest import b64, encode
from tests.integration.conftest import deploy, shipped_config

LABELS = ["a photo of an animal", "a photo of a vehicle"]


def rocket_png() -> bytes:
    return encode(Image.fromarray(data.rocket()), "PNG")


def invoice_png() -> bytes:
    """A scanned-looking invoice line and a card number."""
    image = Image.new("RGB", (900, 260), "white")
    draw = ImageDraw.Draw(image)
    draw.text((30, 30), "INVOICE No 42", fill="black", font=ImageFont.load_default(size=56))
    draw.text((30, 140), "Card 4111 1111 1111 1111", fill="black", font=ImageFont.load_default(size=56))
    return encode(image, "PNG")


def noise_png() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)), "PNG")


def classify(client, image: bytes, concepts: list[str]) -> dict:
    response = client.post("/v1/vision/classify", json={"image": b64(image), "concepts": concepts})
    assert response.status_code == 200, response.text
    return {c["concept"]: c["probability"] for c in response.json()["concepts"]}


def analyze(client, image: bytes, policy: str, **body) -> httpx.Response:
    return client.post("/v1/multimodal/analyze", json={"image": b64(image), "labels": LABELS, "policy": policy} | body)


# --- roll-ups -------------------------------------------------------------------------------


def test_chelsea_is_an_animal_and_a_cat_not_a_vehicle(client, chelsea_jpeg):
    rolled = classify(client, chelsea_jpeg, ["animal", "cat", "feline", "vehicle", "dog", "entity"])
    assert rolled["animal"] > 0.95 and rolled["cat"] > 0.9 and rolled["feline"] >= rolled["cat"]
    assert rolled["vehicle"] < 0.01 and rolled["dog"] < 0.05
    assert rolled["entity"] == pytest.approx(1.0, abs=1e-4)  # the root holds every class


def test_coffee_is_food_or_a_beverage(client, coffee_jpeg):
    rolled = classify(client, coffee_jpeg, ["food", "beverage", "animal"])
    assert max(rolled["food"], rolled["beverage"]) > 0.9 and rolled["animal"] < 0.01


def test_an_unknown_concept_gets_a_422_with_close_matches(client, chelsea_jpeg):
    response = client.post("/v1/vision/classify", json={"image": b64(chelsea_jpeg), "concepts": ["animl"]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "concepts", 0] and "close matches: animal" in error["msg"]


# --- the shipped policies on real model outputs ---------------------------------------------


def test_content_safety_flags_a_rocket_launch_as_weapon_like_and_passes_a_cat(client, chelsea_jpeg):
    rocket = analyze(client, rocket_png(), "content-safety")
    assert rocket.status_code == 200, rocket.text
    decision = rocket.json()["policy"]
    assert decision["flags"] == ["weapon-like"]  # missile and projectile are weapons in WordNet
    (fired,) = decision["fired"]
    assert 0.1 < fired["facts"]["concepts"]["weapon"] < 0.5
    cat = analyze(client, chelsea_jpeg, "content-safety").json()["policy"]
    assert cat["fired"] == [] and cat["flags"] == [] and cat["evaluated"] == 2


def test_document_routing_sends_an_invoice_to_finance_and_masks_its_card_number(client):
    response = client.post("/v1/multimodal/describe", json={"image": b64(invoice_png()), "policy": "document-routing"})
    assert response.status_code == 200, response.text
    body = response.json()
    decision = body["policy"]
    assert decision["route"] == "finance", decision
    read = " ".join(line["text"] for line in body["evidence"]["text"])
    assert "INVOICE" in read.upper() and "[masked]" in read and "4111" not in read
    assert "4111" not in body["evidence"]["prompt"] and "4111" not in body["description"]
    assert decision["masked"] >= 1
    # The caller's text routes too; a cat photo with no such text goes nowhere.
    text = client.post(
        "/v1/multimodal/analyze", json={"text": "Please sign the attached contract", "labels": LABELS,
                                        "policy": "document-routing"},
    )  # fmt: skip
    assert text.json()["policy"]["route"] == "legal"


def test_the_confidence_gate_sends_noise_to_review_and_lets_a_clear_photo_through(client, chelsea_jpeg):
    unsure = analyze(client, noise_png(), "confidence-gate").json()["policy"]
    assert unsure["route"] == "human-review" and unsure["annotations"][0]["rule"] == "say-why"
    assert analyze(client, chelsea_jpeg, "confidence-gate", top_k=1).json()["policy"]["route"] is None


def test_an_unknown_policy_is_a_422_naming_the_known_ones(client, chelsea_jpeg):
    response = analyze(client, chelsea_jpeg, "no-such-policy")
    assert response.status_code == 422
    assert "content-safety" in response.json()["detail"][0]["msg"]


# --- policies changed live ------------------------------------------------------------------


def ingress_policies(config: dict) -> dict:
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    return ingress["user_config"]["policies"]


def rule_ids(client, policy: str) -> set[str]:
    """The rule ids of ``policy`` as every ingress replica that answers says (several asks: two replicas)."""
    seen = set()
    for _ in range(8):
        listed = {p["name"]: p for p in client.get("/v1/policies").json()["policies"]}
        seen.add(frozenset(rule["id"] for rule in listed[policy]["rules"]))
    return set.union(*map(set, seen)) if len(seen) == 1 else set()


@pytest.fixture
def restore_shipped(tmp_path):
    yield tmp_path
    deploy(shipped_config(), tmp_path / "shipped.yaml")


def test_policies_change_live_without_a_dropped_request_and_a_malformed_change_is_refused_by_name(
    client, app_url, chelsea_jpeg, restore_shipped
):
    config = shipped_config()
    stricter = ingress_policies(config)["content-safety"]
    stricter["rules"].append({"id": "any-weapon", "when": 'concepts["weapon"] > 0.1', "action": "block",
                              "priority": 200})  # fmt: skip
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=app_url, timeout=60) as session:
            while not stop.is_set():
                statuses.append(analyze(session, chelsea_jpeg, "content-safety").status_code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        deploy(config, restore_shipped / "stricter.yaml")
        deadline = time.monotonic() + 60
        while "any-weapon" not in rule_ids(client, "content-safety") and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    blocked = analyze(client, rocket_png(), "content-safety")
    assert blocked.status_code == 403
    assert blocked.json()["detail"][0]["msg"] == "refused by rule 'any-weapon' of policy 'content-safety'"

    # A malformed rule in a live update: refused by name, and the policies in force stay.
    stricter["rules"][0]["when"] = 'concepts["weapon"] >'
    deploy(config, restore_shipped / "malformed.yaml")
    for _ in range(8):  # both ingress replicas
        listing = client.get("/v1/policies").json()
        assert "policy 'content-safety': rule 'weapons': the condition does not parse" in listing["update_error"]
    assert {"weapons", "weapon-like", "any-weapon"} <= rule_ids(client, "content-safety")
    assert analyze(client, rocket_png(), "content-safety").status_code == 403


# --- knowledge-grounded answers (the real language model, through OpenAI's client) -----------


@pytest.fixture(scope="module")
def llm(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client
    client.close()


def test_a_question_about_the_object_in_an_image_is_answered_from_its_definition(llm, chelsea_jpeg):
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(chelsea_jpeg)}},
        {"type": "text", "text": "What country does this kind of cat come from?"},
    ]
    reply = llm.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=60,
        extra_body={"knowledge": True},
    )  # fmt: skip
    sources = {source["name"]: source for source in reply.model_extra["knowledge"]}
    assert "egyptian_cat.n.01" in sources and sources["egyptian_cat.n.01"]["definition"] == "a domestic cat of Egypt"
    assert "egypt" in reply.choices[0].message.content.lower()


def test_a_question_naming_a_concept_is_answered_from_its_definition(llm):
    reply = llm.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "What is a hartebeest?"}], temperature=0, max_tokens=60,
        extra_body={"knowledge": True},
    )  # fmt: skip
    (source,) = reply.model_extra["knowledge"]
    assert source["name"] == "hartebeest.n.01" and "antelope" in source["definition"]
    assert "antelope" in reply.choices[0].message.content.lower()  # without the fact, 135M parameters guess wrong
