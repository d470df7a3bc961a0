"""Request and response bodies of the OpenAI-compatible routes, as OpenAI's API reference has them.

What this service does not support is refused by name rather than ignored: ``n`` other than 1, penalties
other than 0, and any field OpenAI does not define (``"Unrecognized request argument supplied"``, as OpenAI
answers). Text is bounded before it is tokenized: messages, characters per message and in all
(``deployments.settings``, ``MAAS_MAX_MESSAGES`` and the like), stop strings, embedding inputs; so are JSON
schemas (``response_format``, tools' parameters: size and nesting) before the grammar engine sees them.
"""

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from api.knowledge import KnowledgeSource, PolicyDecision
from api.openapi import Language, integral
from deployments import json_schema
from deployments import tools as tool_format
from deployments.audio import OUTPUT_FORMATS
from deployments.contracts import MAX_PROMPT_CHARS as MAX_TRANSCRIPTION_PROMPT_CHARS
from deployments.contracts import Grammar
from deployments.settings import limits
from knowledge.rules import NAME_PATTERN

_L = limits()
MAX_MESSAGES = _L.max_messages
MAX_MESSAGE_CHARS = _L.max_message_chars
MAX_PROMPT_CHARS = _L.max_prompt_chars
MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 64
MAX_USER_CHARS = 256
MAX_CHAT_IMAGES = _L.max_chat_images
MAX_SPEECH_CHARS = _L.max_speech_chars
MAX_AUDIO_CLIPS = _L.max_audio_clips
MAX_AUDIO_B64_CHARS = 4 * -(-_L.max_audio_bytes // 3)
# Base64 of the largest accepted image, and its data URL prefix.
MAX_IMAGE_URL_CHARS = 4 * -(-_L.max_image_bytes // 3) + 128
MAX_SCHEMA_CHARS = _L.max_schema_chars
MAX_SCHEMA_DEPTH = _L.max_schema_depth
MAX_TOOLS = _L.max_tools
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, chat
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit, completions
MAX_REGEX_CHARS = 1024

# JSON Schema's integers (5.0 is one); constraints before the validator keep them in the schema.
Tokens = Annotated[int, Field(ge=1), BeforeValidator(integral)]
Seed = Annotated[int, BeforeValidator(integral)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


JsonSchema = Annotated[
    dict[str, Any], AfterValidator(lambda schema: json_schema.bounded(schema, MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH))
]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class JsonSchemaFormat(Request):
    name: Name = Field(description="The schema's name (letters, digits, `_` and `-`, at most 64).")
    description: Annotated[str, Field(max_length=1024)] | None = None
    schema_: JsonSchema = Field(
        default_factory=dict,
        alias="schema",
        description=f"A JSON Schema the answer must validate against, at most {MAX_SCHEMA_CHARS} characters and "
        f"{MAX_SCHEMA_DEPTH} levels deep (`MAAS_MAX_SCHEMA_CHARS`, `MAAS_MAX_SCHEMA_DEPTH`).",
    )
    strict: bool | None = Field(
        None, description="Accepted; the answer is held to the schema either way (constrained decoding)."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextFormat(Request):
    type: Literal["text"]


class JsonObjectFormat(Request):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


def _format_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("text", "json_object", "json_schema") else None


ResponseFormat = Annotated[
    Union[
        Annotated[TextFormat, Tag("text")],
        Annotated[JsonObjectFormat, Tag("json_object")],
        Annotated[JsonSchemaResponseFormat, Tag("json_schema")],
    ],
    Discriminator(
        _format_kind,
        custom_error_type="invalid_response_format",
        custom_error_message="response_format's type must be 'text', 'json_object' or 'json_schema'",
    ),
]


def format_kind(response_format) -> str:
    return response_format.type if response_format is not None else "text"


def response_grammar(response_format, guided_regex: str | None = None) -> Grammar | None:
    """The grammar an answer is held to, from ``response_format`` (or the ``guided_regex`` extension)."""
    if guided_regex is not None:
        return Grammar("regex", guided_regex, ("guided_regex",))
    if isinstance(response_format, JsonObjectFormat):
        return Grammar("json_object", field=("response_format",))
    if isinstance(response_format, JsonSchemaResponseFormat):
        schema = json.dumps(response_format.json_schema.schema_, separators=(",", ":"), sort_keys=True)
        return Grammar("json_schema", schema, ("response_format", "json_schema", "schema"))
    return None


class FunctionDefinition(Request):
    name: Name
    description: Annotated[str, Field(max_length=1024)] | None = None
    parameters: JsonSchema = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON Schema of the arguments (an object), bounded as `response_format`'s.",
    )
    strict: bool | None = Field(None, description="Accepted; forced calls are held to the schema either way.")


class Tool(Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request):
    name: Name


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(Request):
    name: Name
    arguments: Annotated[str, Field(max_length=MAX_SCHEMA_CHARS)] = Field(description="The arguments, as JSON.")


class ToolCall(Request):
    id: Annotated[str, Field(min_length=1, max_length=64)]
    type: Literal["function"]
    function: FunctionCall


class TextPart(Request):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]


DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")


class ImageURL(Request):
    url: Annotated[
        str, Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS, json_schema_extra={"pattern": f"^{DATA_URL.pattern}"})
    ] = Field(
        description="The image as a data URL, `data:image/<format>;base64,<data>` (JPEG, PNG, WebP, BMP, GIF or "
        "TIFF). Remote `http(s)` URLs are refused: the service fetches nothing from the network."
    )
    detail: Literal["auto", "low", "high"] = Field("auto", description="Accepted and ignored.")

    @field_validator("url")
    @classmethod
    def _inline(cls, url: str) -> str:
        if DATA_URL.match(url):
            return url
        if url.lower().startswith(("http://", "https://")):
            raise ValueError(
                "remote image URLs are not fetched (the service reaches no network); send the image inline as "
                "a data URL: data:image/png;base64,..."
            )
        raise ValueError("the image must be a base64-encoded image in a data URL: data:image/<format>;base64,...")


class ImagePart(Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Request):
    data: Annotated[str, Field(min_length=1, max_length=MAX_AUDIO_B64_CHARS)] = Field(
        description="The audio file, base64-encoded (no data URL prefix)."
    )
    format: Literal["wav", "mp3", "flac", "ogg", "webm", "m4a"] = Field(
        description="Its format: OpenAI's `wav` and `mp3`, and as an extension `flac`, `ogg`, `webm`, `m4a`. The "
        "file is decoded by what its bytes are."
    )


class AudioPart(Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


def _part_kind(part) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    parts = {"text": "TextPart", "image_url": "ImagePart", "input_audio": "AudioPart"}
    return parts.get(kind) if isinstance(kind, str) else None


def _content_kind(content) -> str | None:
    return "str" if isinstance(content, str) else "list" if isinstance(content, list) else None


# Tagged unions, so a bad part is reported once, where it is: the tags are names error messages leave out of
# the field path (``messages.0.content.1.image_url.url``).
ContentPart = Annotated[
    Union[
        Annotated[TextPart, Tag("TextPart")],
        Annotated[ImagePart, Tag("ImagePart")],
        Annotated[AudioPart, Tag("AudioPart")],
    ],
    Discriminator(
        _part_kind,
        custom_error_type="invalid_content_part",
        custom_error_message="a content part's type must be 'text', 'image_url' or 'input_audio'",
    ),
]
Content = Annotated[
    Union[
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS), Tag("str")],
        Annotated[list[ContentPart], Field(max_length=64), Tag("list")],
    ],
    Discriminator(
        _content_kind,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class Message(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="`developer` is treated as `system`. Images (`image_url` parts) are taken in `user` messages "
        f"only, at most {MAX_CHAT_IMAGES} in a chat (`MAAS_MAX_CHAT_IMAGES`); so is audio (`input_audio` parts, "
        f"heard by the `asr` model), at most {MAX_AUDIO_CLIPS} clips in a chat (`MAAS_MAX_AUDIO_CLIPS`). A `tool` "
        "message is a tool's result, with the `tool_call_id` of the assistant's call it answers."
    )
    content: Content | None = Field(None, description="Required, except in an assistant message with tool_calls.")
    name: Annotated[str, Field(max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOLS)] | None = Field(
        None, description="An assistant message's calls, as an earlier answer gave them."
    )
    tool_call_id: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="In a `tool` message: the call it answers."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Message":
        if self.role != "user" and self.images():
            raise ValueError("images are accepted in user messages only")
        if self.role != "user" and self.audios():
            raise ValueError("audio is accepted in user messages only")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be left out only in an assistant message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are for assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    def text(self) -> str:
        """The message's text parts (images aside)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    def images(self) -> list[tuple[int, ImagePart]]:
        """The image parts, with their index in the content."""
        if not isinstance(self.content, list):
            return []
        return [(index, part) for index, part in enumerate(self.content) if isinstance(part, ImagePart)]

    def audios(self) -> list[tuple[int, AudioPart]]:
        """The audio parts, with their index in the content."""
        if not isinstance(self.content, list):
            return []
        return [(index, part) for index, part in enumerate(self.content) if isinstance(part, AudioPart)]

    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(Request):
    include_usage: bool = False


class Sampling(Request):
    """What chat completions and completions share."""

    model: str = Field(description="`llm`, as `GET /v1/models` lists it.")
    max_tokens: Tokens | None = Field(None, description="Default and cap: the deployment's settings.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (anything under 1e-5) is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = Field(None, description="The same seed gives the same answer (any integer).")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = Field(None, description="Accepted and ignored.")
    n: Literal[1] = Field(1, description="One choice per request.")
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Tokens | None = Field(None, description="The newer name of `max_tokens`.")
    logprobs: bool = Field(
        False,
        description="Each answer token's log probability, in the distribution it was drawn from (after the "
        "response format's or tools' constraint, temperature and top_p).",
    )
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(integral)] | None = Field(
        None, description=f"With logprobs: the most likely tokens at each position too, 0 to {MAX_TOP_LOGPROBS}."
    )
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = Field(
        None, description=f"Functions the model may call, at most {MAX_TOOLS} (`MAAS_MAX_TOOLS`)."
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description="`none`: answer in text; `auto` (the default with tools): the model decides; `required`: at "
        "least one call; `{type: function, function: {name}}`: one call of that function. Forced calls are held to the "
        "functions' names and parameter schemas by the grammar; an `auto` call parses too.",
    )
    parallel_tool_calls: bool = Field(True, description="Whether an answer may hold more than one call.")
    response_format: ResponseFormat | None = Field(
        None,
        description="`json_object`: the answer is a JSON object; `json_schema`: it validates against the schema. "
        "Enforced token by token (constrained decoding): every complete answer parses, but one cut short by "
        "max_tokens (`finish_reason: length`) is incomplete JSON.",
    )
    # Extensions (the openai client sends them with extra_body):
    knowledge: bool = Field(
        False,
        description="Extension: give the model the knowledge graph's facts (WordNet) about the images' classes and "
        "the concepts the last user message names; the answer's `knowledge` lists them as sources.",
    )
    policy: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = Field(
        None,
        description="Extension: a policy (GET /v1/policies) to check the answer with; its decision is in the "
        "answer's `policy`, and a `block` refuses the request (403). With `stream`, the answer is checked "
        "whole before it is sent, in one chunk.",
    )

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("tool_choice")
    @classmethod
    def _a_tool(cls, choice, info: ValidationInfo):
        tools = info.data.get("tools")
        if choice is not None and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError("tool_choice names a function that is not one of the tools")
        return choice

    @field_validator("response_format")
    @classmethod
    def _not_with_tools(cls, response_format, info: ValidationInfo):
        calls = info.data.get("tools") and info.data.get("tool_choice") != "none"
        if calls and response_format is not None and not isinstance(response_format, TextFormat):
            raise ValueError(
                "a response_format other than text cannot be combined with tools (unless tool_choice is none)"
            )
        return response_format

    @field_validator("messages")
    @classmethod
    def _bounded(cls, messages: list[Message]) -> list[Message]:
        total = sum(len(message.text()) for message in messages)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages have {total} characters; at most {MAX_PROMPT_CHARS} in all")
        images = sum(len(message.images()) for message in messages)
        if images > MAX_CHAT_IMAGES:
            raise ValueError(f"the messages have {images} images; at most {MAX_CHAT_IMAGES} in one chat")
        clips = sum(len(message.audios()) for message in messages)
        if clips > MAX_AUDIO_CLIPS:
            raise ValueError(f"the messages have {clips} audio clips; at most {MAX_AUDIO_CLIPS} in one chat")
        called: set[str] = set()
        for message in messages:
            called.update(call.id for call in message.tool_calls or ())
            if message.tool_call_id is not None and message.tool_call_id not in called:
                raise ValueError("a tool message's tool_call_id must be the id of an earlier assistant tool call")
        return messages

    def image_urls(self) -> list[tuple[tuple, str]]:
        """Every image of the chat in order, with where it is in the request (``messages.i.content.j``)."""
        return [
            (("messages", m, "content", j, "image_url", "url"), part.image_url.url)
            for m, message in enumerate(self.messages)
            for j, part in message.images()
        ]

    def audio_parts(self) -> list[tuple[tuple, InputAudio]]:
        """Every audio clip of the chat in order, with where it is in the request (``messages.i.content.j``)."""
        return [
            (("messages", m, "content", j, "input_audio", "data"), part.input_audio)
            for m, message in enumerate(self.messages)
            for j, part in message.audios()
        ]

    def token_cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top(self) -> int | None:
        """How many alternatives per token the model reports (``None``: no log probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def choice(self) -> str:
        """The tool choice as a mode: none, auto, required or named (``auto`` with tools and no choice)."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return "named" if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice

    def functions(self) -> list[dict]:
        """The tools the model is told of, as ``{"name", "description", "parameters"}``; none with ``none``."""
        if self.choice() == "none":
            return []
        return [tool.function.model_dump(exclude_none=True, exclude={"strict"}) for tool in self.tools]

    def grammar(self) -> Grammar | None:
        """What the answer is held to: the tools' call format, or the response format."""
        mode = self.choice()
        if mode == "none":
            return response_grammar(self.response_format)
        allowed = self.functions()
        if mode == "named":
            allowed = [f for f in allowed if f["name"] == self.tool_choice.function.name]
        parallel = self.parallel_tool_calls and mode != "named"  # a named function is called once
        return Grammar("lark", tool_format.grammar(allowed, mode, parallel), ("tools",))


class CompletionRequest(Sampling):
    prompt: (
        Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=1)
        ]
    ) = Field(description="One prompt (a string, or a list of one string).")
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS), BeforeValidator(integral)] | None = Field(
        None,
        description=f"Each token's log probability and the {MAX_COMPLETION_LOGPROBS} at most most likely tokens, "
        "in the distribution it was drawn from.",
    )
    response_format: ResponseFormat | None = Field(
        None, description="Extension (as vLLM's): `json_object` or `json_schema`, held to as on chat completions."
    )
    guided_regex: Annotated[str, Field(min_length=1, max_length=MAX_REGEX_CHARS)] | None = Field(
        None, description="Extension (as vLLM's): a regular expression the whole completion matches."
    )

    @field_validator("guided_regex")
    @classmethod
    def _one_constraint(cls, regex: str | None, info: ValidationInfo) -> str | None:
        if regex is not None and info.data.get("response_format") is not None:
            raise ValueError("response_format and guided_regex cannot be combined")
        return regex

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def grammar(self) -> Grammar | None:
        return response_grammar(self.response_format, self.guided_regex)

    def format_kind(self) -> str:
        """What the answer is held to, for the metrics: text, json_object, json_schema or regex."""
        return "regex" if self.guided_regex is not None else format_kind(self.response_format)


EmbeddingText = Annotated[str, Field(min_length=1, max_length=_L.max_text_chars)]


class EmbeddingRequest(Request):
    model: str = Field(description="`text`, the sentence encoder, as `GET /v1/models` lists it.")
    input: EmbeddingText | Annotated[list[EmbeddingText], Field(min_length=1, max_length=_L.max_texts)]
    encoding_format: Literal["float", "base64"] = "float"
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- responses ------------------------------------------------------------------------


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class HeardAudio(BaseModel):
    """What an ``input_audio`` clip said, as the ``asr`` model heard it."""

    text: str
    language: str = Field(description="ISO 639-1 code of the language heard.")
    duration: float = Field(description="Seconds of audio.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="The served model's version.")
    choices: list[ChatChoice]
    usage: Usage
    knowledge: list[KnowledgeSource] | None = Field(None, description="Extension: the facts given, with knowledge.")
    policy: PolicyDecision | None = Field(None, description="Extension: the decision of the policy asked for.")
    transcripts: list[HeardAudio] | None = Field(
        None, description="Extension: what each `input_audio` clip said, in the order of the chat."
    )


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = Field(None, description="`{index, id, type, function: {name, arguments}}`.")


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32s.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    """OpenAI's model object (``id``, ``object``, ``created``, ``owned_by``), and after it this service's
    details of the replica that answered."""

    id: str = Field(description="The name requests use: `vision`, `text`, `fusion`, `llm`.")
    object: Literal["model"] = "model"
    created: int = Field(description="When the answering replica started (Unix seconds).")
    owned_by: str = "maas-cluster"
    name: str = Field(description="The model the replica serves, e.g. SmolLM2-135M-Instruct.")
    task: str
    source: str
    version: str
    device: str
    resources: dict[str, float] = Field(description="Ray resources held by the replica that answered.")
    torch_threads: int
    placement: dict = Field(
        default_factory=dict, description="Where the replica that answered runs: replica id, node id, GPU ids."
    )
    details: dict = Field(default_factory=dict)
    drift: dict | None = Field(
        None,
        description="Drift of the answering replica's recent traffic against the model's reference profile: "
        "status (ok, drift, collecting, disabled, no_reference), scores, thresholds, window.",
    )
    rollout: dict | None = Field(
        None,
        description="The model's rollout, if it has one: its candidate application, the mode and the candidate's "
        "weight in force, whether the candidate is ready, and its model's name and version.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(None, description="The request field at fault, as a dotted path.")
    code: str | None = Field(None, description="This service's error type, e.g. context_length_exceeded.")


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- audio ------------------------------------------------------------------------------------------------

TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MAX_VOICE_CHARS = 64


class _AudioForm(BaseModel):
    """A multipart form of the audio routes: every value arrives as text, read as the field's type."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="The audio file (FLAC, MP3, MP4/M4A, Ogg, WAV or WebM), as a form upload.")
    model: str = Field(description="`asr`, as `GET /v1/models` lists it.")
    prompt: Annotated[str, Field(max_length=MAX_TRANSCRIPTION_PROMPT_CHARS)] | None = Field(
        None, description="Text the speech follows on from: names, spelling, style (Whisper reads its last 223 tokens)."
    )
    response_format: Literal[TRANSCRIPT_FORMATS] = "json"
    temperature: float = Field(
        0.0, ge=0.0, le=1.0, description="0: greedy, then hotter where a window fails the quality checks."
    )
    policy: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = Field(
        None,
        description="Extension: a policy (GET /v1/policies) to check what was said with; a `block` refuses "
        "the request (403), `mask` rules mask the transcript.",
    )


class TranscriptionForm(_AudioForm):
    language: Language | None = None
    timestamp_granularities: Annotated[list[Literal["word", "segment"]], Field(min_length=1, max_length=2)] | None = (
        Field(None, description="`timestamp_granularities[]`: `segment` and/or `word`; with `verbose_json` only.")
    )
    stream: bool = Field(False, description="Server-Sent Events: `transcript.text.delta`, then `.done`.")

    @model_validator(mode="after")
    def _consistent(self) -> "TranscriptionForm":
        if self.timestamp_granularities and self.response_format != "verbose_json":
            raise ValueError("timestamp_granularities[] needs response_format verbose_json")
        if self.stream and self.response_format not in ("json", "text"):
            raise ValueError("stream is for response_format json or text")
        return self

    def words(self) -> bool:
        return "word" in (self.timestamp_granularities or ())


class TranslationForm(_AudioForm):
    """Speech in any language Whisper knows, English text out."""


class AudioUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: int = Field(description="Seconds of audio heard, rounded up.")


class Transcription(BaseModel):
    text: str
    usage: AudioUsage


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str = Field(description="The language heard, by its English name (`english`), as OpenAI gives it.")
    duration: float = Field(description="Seconds of audio.")
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: AudioUsage


class SpeechBody(Request):
    model: str = Field(description="`tts`, as `GET /v1/models` lists it.")
    input: Annotated[str, Field(min_length=1, max_length=MAX_SPEECH_CHARS)] = Field(
        description=f"The text to say, at most {MAX_SPEECH_CHARS} characters (`MAAS_MAX_SPEECH_CHARS`)."
    )
    voice: Annotated[str, Field(min_length=1, max_length=MAX_VOICE_CHARS)] = Field(
        description="A voice the `tts` model has (`GET /v1/models`: its details' `voices`)."
    )
    response_format: Literal[OUTPUT_FORMATS] = Field(
        "mp3", description="pcm is 16-bit little-endian mono at 24 kHz, as OpenAI's; the others at the voice's rate."
    )
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Tempo, its pitch unchanged.")
    stream_format: Literal["audio", "sse"] = Field(
        "audio",
        description="`audio`: the bytes, streamed as each sentence is said; `sse`: `speech.audio.delta` events.",
    )
