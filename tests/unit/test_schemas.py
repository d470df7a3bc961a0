import pytest
from pydantic import ValidationError

from deployments import schemas
from deployments.settings import limits


def errors(model, payload) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(payload)
    return info.value.errors()


def test_unknown_fields_are_refused_by_name():
    (error,) = errors(schemas.TextEmbedRequest, {"texts": ["hi"], "colour": "red"})
    assert error["type"] == "extra_forbidden" and error["loc"] == ("colour",)


def test_text_is_stripped_and_must_not_be_empty():
    assert schemas.TextClassifyRequest(text="  hi ", labels=["a"]).text == "hi"
    (error,) = errors(schemas.TextClassifyRequest, {"text": "   ", "labels": ["a"]})
    assert error["loc"] == ("text",) and "at least 1 character" in error["msg"]


def test_text_too_long_is_refused():
    (error,) = errors(schemas.TextClassifyRequest, {"text": "x" * (limits().max_text_chars + 1), "labels": ["a"]})
    assert error["loc"] == ("text",) and "at most" in error["msg"]


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
