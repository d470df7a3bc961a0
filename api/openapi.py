"""OpenAPI documents of routes that read their bodies themselves."""

from pydantic import BaseModel


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
