"""How a generation becomes OpenAI's answer: content or tool calls, log probabilities, and the streamed events.

A chat answer with tools is read by ``deployments.tools``: an answer that begins with a call is calls
(``message.tool_calls``, ``finish_reason: tool_calls``). Streamed, text is sent as it comes once it cannot be
the start of a call; a call is held until it is complete and then sent as OpenAI streams one: a delta with
its ``index``, ``id``, ``type`` and ``function.name`` (arguments empty), then one with its arguments. Joined,
the deltas are the call the unstreamed answer has.

Log probabilities travel with the text they belong to: on a streamed chunk, those of its tokens.
"""

from api.openai import schemas
from deployments import tools as tool_format
from deployments.contracts import GenerationChunk, TokenLogprob


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> schemas.ChoiceLogprobs | None:
    if logprobs is None:
        return None
    return schemas.ChoiceLogprobs(
        content=[
            schemas.TokenLogprob(
                token=item.token, logprob=item.logprob, bytes=item.bytes,
                top_logprobs=[schemas.TopLogprob(token=t, bytes=b, logprob=v) for t, b, v in item.top],
            )
            for item in logprobs
        ]
    )  # fmt: skip


def completion_logprobs(logprobs: list[TokenLogprob] | None, offset: int = 0) -> schemas.CompletionLogprobs | None:
    """The completions API's (legacy) shape: parallel lists, and each token's offset in the text from ``offset``."""
    if logprobs is None:
        return None
    offsets = []
    for item in logprobs:
        offsets.append(offset)
        offset += len(item.token)
    return schemas.CompletionLogprobs(
        tokens=[item.token for item in logprobs],
        token_logprobs=[item.logprob for item in logprobs],
        top_logprobs=[{t: v for t, _, v in item.top} for item in logprobs],
        text_offset=offsets,
    )


def chat_message(text: str, finish_reason: str, tools: bool) -> tuple[schemas.AssistantMessage, str]:
    """The assistant's message and the finish reason, for an answer whose whole text is ``text``."""
    content, calls = tool_format.parse(text) if tools else (text, [])
    if tools and not calls:
        content = text  # a call cut short: the text, rather than nothing
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    tool_calls = [schemas.ToolCall(**call) for call in calls] or None
    return schemas.AssistantMessage(content=content, tool_calls=tool_calls), finish_reason


class ChatEvents:
    """The ``choices`` entries of a streamed chat answer, chunk by chunk; holds back what may be a tool call."""

    def __init__(self, tools: bool, logprobs: bool):
        self.tools = tools
        self.logprobs = logprobs
        self.held = ""  # text that may be, or is, a tool call
        self.held_logprobs: list[TokenLogprob] = []
        self.calls = False  # the answer is calls

    def choices(self, chunk: GenerationChunk) -> list[dict]:
        """The choices to send for ``chunk`` (a list of one-choice events' ``choices``' single entry)."""
        if chunk.completion_tokens == 0 and not chunk.text and chunk.finish_reason is None:
            return [self._choice({"role": "assistant", "content": ""})]
        events = []
        text, logprobs = chunk.text, chunk.logprobs or []
        if self.tools and (self.held or text) and (self.calls or tool_format.may_be_call(self.held + text)):
            self.held += text
            self.held_logprobs += logprobs
            self.calls = self.calls or self.held.lstrip().startswith(tool_format.OPEN)
            text, logprobs = "", []
        elif self.held:  # it was not a call after all: send what was held, with this
            text, logprobs = self.held + text, self.held_logprobs + logprobs
            self.held, self.held_logprobs = "", []
        if chunk.finish_reason is None:
            return [self._choice({"content": text}, logprobs)] if text or logprobs else []
        finish = chunk.finish_reason
        if self.held:
            message, finish = chat_message(self.held, finish, tools=True)
            if message.tool_calls:
                events += self._calls(message.tool_calls, self.held_logprobs)
            else:
                text, logprobs = self.held + text, self.held_logprobs + logprobs
        if text or logprobs:
            events.append(self._choice({"content": text}, logprobs))
        events.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
        return events

    def _calls(self, calls: list[schemas.ToolCall], logprobs: list[TokenLogprob]) -> list[dict]:
        events = []
        for index, call in enumerate(calls):
            named = {"index": index, "id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": ""}}  # fmt: skip
            events.append(
                self._choice({"role": None, "content": None, "tool_calls": [named]}, logprobs if index == 0 else [])
            )
            arguments = {"index": index, "function": {"arguments": call.function.arguments}}
            events.append(self._choice({"tool_calls": [arguments]}))
        return events

    def _choice(self, delta: dict, logprobs: list[TokenLogprob] | None = None) -> dict:
        delta = {key: value for key, value in delta.items() if value is not None or key == "content"}
        rendered = chat_logprobs(logprobs or []).model_dump() if self.logprobs else None
        return {"index": 0, "delta": delta, "logprobs": rendered, "finish_reason": None}
