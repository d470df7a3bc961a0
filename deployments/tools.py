"""Tool calling: how tools and calls are written into a prompt, the grammar that holds a call to its tool, and
reading calls back out of an answer. The one place that knows the call format.

The format is Hermes's, the one Qwen2.5's and NousResearch's chat templates use, so a model trained on it
reads and writes it as it learnt, and the parser is the same for a model whose template has a tools section:

* the tools, as JSON lines between ``<tools>`` and ``</tools>`` in a system message, with the instruction to
  answer a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* an assistant's earlier calls, as those blocks after its text;
* a tool's result, as a system message ``Result of <function>: <content>``. Hermes puts it in a user turn
  between ``<tool_response>`` tags; SmolLM2-135M, given that, repeats the result instead of using it, and
  given this answers from it (measured on the weather example of the README).

A model whose chat template renders tools itself (``"tools"`` in its template) gets them through its template
(``LanguageModel.chat_prompt``); the shipped SmolLM2-135M-Instruct has none and gets this module's rendering.

The grammar (llguidance's Lark dialect, with each call's JSON schema embedded by ``%json``): ``required`` and
a named function give one call (several with ``parallel_tool_calls``) whose ``name`` is one of the allowed
functions and whose ``arguments`` validate against its parameters (closed, as ``json_schema.closed`` says);
``auto`` gives those or free text that
does not begin with ``<``, so whatever the model decides parses.
"""

import json
import re
import uuid

from deployments.json_schema import closed

OPEN, CLOSE = "<tool_call>", "</tool_call>"

SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.S)


def render(messages: list[dict], functions: list[dict]) -> list[dict]:
    """A chat with tools, tool calls and tool results, as plain ``{"role", "content"}`` messages."""
    rendered = []
    if functions:
        listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        section = SYSTEM.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            messages = [{**messages[0], "content": f"{_text(messages[0])}\n\n{section}"}, *messages[1:]]
        else:
            rendered.append({"role": "system", "content": section})
    called = {}  # call id -> function name
    for message in messages:
        role = message["role"]
        if role == "tool":
            name = called.get(message.get("tool_call_id"), "the tool")
            rendered.append({"role": "system", "content": f"Result of {name}: {_text(message)}"})
        elif role == "assistant" and message.get("tool_calls"):
            called.update((call["id"], call["function"]["name"]) for call in message["tool_calls"])
            calls = [
                call_text(call["function"]["name"], call["function"]["arguments"]) for call in message["tool_calls"]
            ]
            rendered.append({"role": "assistant", "content": "\n".join(filter(None, [_text(message), *calls]))})
        else:
            rendered.append({key: value for key, value in message.items() if key in ("role", "content")})
    return rendered


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (``arguments`` is JSON text)."""
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CLOSE}'


def grammar(functions: list[dict], mode: str, parallel: bool) -> str:
    """The Lark grammar of an answer: calls of ``functions`` (``required``, ``named``), or those or free text
    (``auto``); one call, or one or more with ``parallel``."""
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": closed(f.get("parameters") or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ],
        "x-guidance": {"whitespace_flexible": False},
    }
    calls = 'call ("\\n" call)*' if parallel else "call"
    rules = [
        f"calls: {calls}",
        f'call: "{OPEN}\\n" call_json "\\n{CLOSE}"',
        f"call_json: %json {json.dumps(schema, separators=(',', ':'))}",
    ]
    if mode == "auto":
        return "\n".join(["start: calls | TEXT", r"TEXT: /[^<\s][\s\S]*/", *rules])
    return "\n".join(["start: calls", *rules])


def parse(text: str) -> tuple[str | None, list[dict]]:
    """An answer's text and its calls (``{"id", "type", "function": {"name", "arguments"}}``): an answer that
    begins with a call is calls only."""
    if not text.lstrip().startswith(OPEN):
        return text, []
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue  # a call cut short by max_tokens
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False, separators=(",", ":"))
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": arguments}})  # fmt: skip
    return None, calls


def may_be_call(prefix: str) -> bool:
    """Whether an answer that begins with ``prefix`` may still turn out to be a call."""
    start = prefix.lstrip()
    return start.startswith(OPEN) or OPEN.startswith(start)
