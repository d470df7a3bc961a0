"""JSON schemas a client sends (``response_format``, tools' parameters): bounded before anything compiles
them, and closed for the grammar that holds answers to them."""

import json


def bounded(schema: dict, max_chars: int, max_depth: int) -> dict:
    """A JSON schema no larger and no deeper than the limits, checked before anything compiles it."""
    depth, stack = 0, [(schema, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        if depth > max_depth:
            raise ValueError(f"the schema nests deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > max_chars:
        raise ValueError(f"the schema has {size} characters as JSON; at most {max_chars}")
    return schema


VALUES = ("enum", "const", "default", "examples")
"""Keywords whose values are JSON values, not schemas: left as they are."""
MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
"""Keywords whose values map names to schemas."""


def closed(schema):
    """A copy of a JSON schema whose objects hold only the properties they name, unless they say otherwise
    (``additionalProperties``, ``patternProperties``): what OpenAI's strict mode asks users to write. Every
    answer held to the copy still validates against the original; a small model no longer invents keys."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {}
    for key, value in schema.items():
        if key in VALUES:
            copy[key] = value
        elif key in MAPS and isinstance(value, dict):
            copy[key] = {name: closed(subschema) for name, subschema in value.items()}
        else:
            copy[key] = closed(value)
    if "properties" in copy and "additionalProperties" not in copy and "patternProperties" not in copy:
        copy["additionalProperties"] = False
    return copy
