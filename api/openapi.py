"""OpenAPI documents of routes that read their bodies themselves."""

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, StringConstraints


def integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; so does this API (a ``BeforeValidator`` of integer fields)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def inline(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its definitions in place: a route that reads its body itself documents it in
    ``openapi_extra``, where references to ``$defs`` would not resolve."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def _known_language(code: str) -> str:
    from deployments.contracts import LANGUAGES, UNKNOWN_LANGUAGE

    if code not in LANGUAGES:
        raise ValueError(UNKNOWN_LANGUAGE)
    return code


Language = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z]{2,3}$"),
    AfterValidator(_known_language),
    Field(
        description="The speech's language (ISO 639-1, e.g. `en`); unset, it is detected (one more model pass). "
        "Which languages there are is the served model's: `GET /v1/models` lists them (the `asr` model's "
        "details), so the schema gives their form only.",
    ),
]
"""A language of speech, in every protocol's schemas."""
