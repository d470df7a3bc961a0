import json

import pytest
from pydantic import ValidationError

from api.v1 import schemas
from deployments.settings import limits


def errors(model, payload) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(payload)
    return info.value.errors()


def test_unknown_fields_are_refused_by_name():
    (error,) = errors(schemas.TextEmbedRequest, {"texts": ["hi"], "colour": "red"})
    assert error["type"] == "extra_forbidden" and error["loc"] == ("colour",)


def test_the_not_blank_pattern_is_exactly_str_isspace():
    """Spelled out, so every regex engine reads the schema's pattern the same way."""
    import re
    import sys

    pattern = re.compile(schemas.NOT_BLANK)
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        assert bool(pattern.fullmatch(char)) != char.isspace(), hex(code)


def test_text_is_used_as_sent_and_must_not_be_blank():
    assert schemas.TextClassifyRequest(text="  hi ", labels=["a"]).text == "  hi "
    for blank in ("   ", "\r", "\x1c", "\u2028"):  # whatever str.isspace() calls whitespace
        (error,) = errors(schemas.TextClassifyRequest, {"text": blank, "labels": ["a"]})
        assert error["loc"] == ("text",) and error["type"] == "string_pattern_mismatch"


def test_text_limit_is_on_the_text_as_sent():
    """The schema's maxLength: a leading space does not buy one more character."""
    too_long = " " + "x" * limits().max_text_chars
    (error,) = errors(schemas.TextClassifyRequest, {"text": too_long, "labels": ["a"]})
    assert error["loc"] == ("text",) and "at most" in error["msg"]


def test_the_schema_states_the_rules_validation_enforces():
    schema = schemas.TextClassifyRequest.model_json_schema()
    text, labels = schema["properties"]["text"], schema["properties"]["labels"]
    assert (text["minLength"], text["maxLength"]) == (1, limits().max_text_chars)
    assert text["pattern"] == schemas.NOT_BLANK
    assert labels["uniqueItems"] is True and labels["maxItems"] == limits().max_labels
    assert labels["items"]["maxLength"] == limits().max_label_chars
    top_k = schemas.VisionClassifyRequest.model_json_schema()["properties"]["top_k"]
    assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == ("integer", 1, limits().max_top_k)


def test_every_keyword_in_the_request_schemas_is_json_schema():
    """A constraint pydantic cannot express comes out under its Python name (ge, le), which validators ignore."""
    for model in (
        schemas.VisionClassifyRequest,
        schemas.TextEmbedRequest,
        schemas.TextClassifyRequest,
        schemas.MultimodalRequest,
    ):
        text = json.dumps(model.model_json_schema())
        for python_name in ('"ge"', '"le"', '"gt"', '"lt"', '"min_length"', '"max_length"'):
            assert python_name not in text, (model.__name__, python_name)


def test_labels_must_be_distinct_on_every_route():
    for model, payload in (
        (schemas.TextClassifyRequest, {"text": "hi", "labels": ["cat", "cat"]}),
        (schemas.MultimodalRequest, {"text": "hi", "labels": ["cat", "cat"]}),
    ):
        (error,) = errors(model, payload)
        assert error["loc"] == ("labels",) and "distinct" in error["msg"]


def test_the_schema_example_image_is_a_real_image():
    from deployments.imaging import decode_base64, decode_image

    example = schemas.VisionClassifyRequest.model_json_schema()["properties"]["image"]["examples"][0]
    assert decode_image(decode_base64(example, limits()), limits()).size == (8, 8)


def test_labels_must_be_present_bounded_and_distinct():
    assert errors(schemas.TextClassifyRequest, {"text": "hi", "labels": []})[0]["loc"] == ("labels",)
    too_many = [f"label {i}" for i in range(limits().max_labels + 1)]
    assert "at most" in errors(schemas.TextClassifyRequest, {"text": "hi", "labels": too_many})[0]["msg"]
    (error,) = errors(schemas.MultimodalRequest, {"text": "hi", "labels": ["cat", "cat"]})
    assert "distinct" in error["msg"]


def test_texts_list_is_bounded():
    assert errors(schemas.TextEmbedRequest, {"texts": []})[0]["loc"] == ("texts",)
    assert errors(schemas.TextEmbedRequest, {"texts": ["a"] * (limits().max_texts + 1)})[0]["loc"] == ("texts",)


@pytest.mark.parametrize("top_k", [0, -1, limits().max_top_k + 1])
def test_top_k_is_bounded(top_k):
    assert errors(schemas.VisionClassifyRequest, {"image": "x", "top_k": top_k})[0]["loc"] == ("top_k",)


def test_fusion_weights_are_bounded():
    payload = {"text": "hi", "labels": ["a"], "vision_weight": 1.5}
    assert errors(schemas.MultimodalRequest, payload)[0]["loc"] == ("vision_weight",)


def test_request_models_are_flat_so_one_schema_serves_json_and_forms():
    for model in (schemas.VisionClassifyRequest, schemas.MultimodalRequest, schemas.TextEmbedRequest):
        assert "$defs" not in model.model_json_schema()


MULTIMODAL_CASES = [
    {"labels": ["a"]},
    {"text": "hi", "labels": ["a"]},
    {"image": "x", "labels": ["a"]},
    {"image": None, "text": None, "labels": ["a"]},
    {"text": "hi", "labels": ["a"], "text_weight": 0},
    {"text": "hi", "labels": ["a"], "vision_weight": 0},
    {"image": "x", "labels": ["a"], "vision_weight": 0.0},
    {"image": "x", "labels": ["a"], "text_weight": 0},
    {"image": "x", "text": "hi", "labels": ["a"], "vision_weight": 0},
    {"image": "x", "text": "hi", "labels": ["a"], "vision_weight": 0, "text_weight": 0},
    {"image": "x", "text": "hi", "labels": ["a"], "vision_weight": 0, "text_weight": None},
    {"image": "x", "text": "hi", "labels": ["a", "a"]},
    {"text": " ", "labels": ["a"]},
    {"text": "hi", "labels": ["a"], "top_k": "5"},
    {"text": "hi", "labels": ["a"], "top_k": 5.5},
    {"text": "hi", "labels": ["a"], "extra": 1},
]


@pytest.mark.parametrize("payload", MULTIMODAL_CASES)
def test_schema_and_validation_agree_on_the_multimodal_rules(payload):
    """What a JSON Schema validator (the one schemathesis uses) accepts, the API accepts, and nothing else."""
    import jsonschema_rs

    schema_says = jsonschema_rs.validator_for(schemas.MultimodalRequest.model_json_schema()).is_valid(payload)
    try:
        schemas.MultimodalRequest.model_validate_json(json.dumps(payload), strict=True)
        api_says = True
    except ValidationError:
        api_says = False
    assert schema_says == api_says
