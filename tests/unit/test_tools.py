"""The tool-call format (``deployments.tools``) and the bounds and closing of clients' JSON schemas."""

import json

import pytest

from deployments import json_schema, tools

WEATHER = {"name": "get_weather", "description": "The weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip


def test_tools_are_listed_in_the_system_message_and_results_follow_their_calls():
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]  # fmt: skip
    rendered = tools.render(chat, [WEATHER])
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "system"]
    assert rendered[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps({"type": "function", "function": WEATHER}) in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'
    assert rendered[3]["content"] == "Result of get_weather: 18C"
    assert tools.render([{"role": "user", "content": "hi"}], []) == [{"role": "user", "content": "hi"}]


def test_an_answer_that_begins_with_calls_is_calls_and_any_other_is_text():
    text, calls = tools.parse(' <tool_call>\n{"name":"a","arguments":{"x": 1}}\n</tool_call>\n<tool_call>\n'
                              '{"name":"b","arguments":{}}\n</tool_call>')  # fmt: skip
    assert text is None and [c["function"] for c in calls] == [{"name": "a", "arguments": '{"x":1}'},
                                                              {"name": "b", "arguments": "{}"}]  # fmt: skip
    assert len({c["id"] for c in calls}) == 2
    assert tools.parse("It is sunny <tool_call>") == ("It is sunny <tool_call>", [])
    assert tools.parse('<tool_call>\n{"name":"a","argu') == (None, [])  # cut short: no call
    assert tools.may_be_call("") and tools.may_be_call(" <tool") and tools.may_be_call("<tool_call>{")
    assert not tools.may_be_call("It") and not tools.may_be_call("<b>")


def test_the_grammar_forces_calls_or_lets_auto_answer_in_text():
    required = tools.grammar([WEATHER], "required", parallel=False)
    assert required.startswith("start: calls\n") and "calls: call\n" in required
    assert '"const":"get_weather"' in required and '"additionalProperties":false' in required
    auto = tools.grammar([WEATHER], "auto", parallel=True)
    assert auto.startswith("start: calls | TEXT") and 'calls: call ("\\n" call)*' in auto


def test_schemas_are_bounded_in_size_and_depth_before_anything_compiles_them():
    deep = {"type": "object"}
    for _ in range(10):
        deep = {"type": "object", "properties": {"a": deep}}
    assert json_schema.bounded(deep, 10_000, 32) is deep
    with pytest.raises(ValueError, match="deeper than 16"):
        json_schema.bounded(deep, 10_000, 16)
    with pytest.raises(ValueError, match="at most 100"):
        json_schema.bounded({"enum": ["x" * 200]}, 100, 16)


def test_closed_objects_keep_only_their_named_properties_and_values_are_untouched():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {}}},
            "c": {"const": {"properties": 1}},
            "properties": {"type": "string"},
        },
        "$defs": {"d": {"properties": {}, "additionalProperties": True}},
    }
    closed = json_schema.closed(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"] == {"const": {"properties": 1}}
    assert closed["properties"]["properties"] == {"type": "string"}  # a property may be called that
    assert closed["$defs"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # a copy
