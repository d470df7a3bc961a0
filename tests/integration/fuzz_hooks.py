"""Schemathesis hooks for fuzzing the live API (tests/integration/test_fuzzing.py).

A schema can say that ``image`` is base64 or a file, not that it decodes to a
photo; and a multipart form carries every value as text, which schemathesis
judges before serialising (it labels a form "invalid" by the JSON type of a
value that reaches the server as text, and sometimes labels a form by the
wrong mode altogether). These hooks give it what it cannot know, and nothing
more:

- requests it generates as valid get a real photograph in ``image``, base64
  in JSON and a file in a form (otherwise: random bytes, rightly refused
  with 422, and a run whose valid requests are all refused tests nothing);
- a multipart request is judged as the server receives it (``wire_form``):
  every value as the text that was sent, read back as JSON in the fields that
  take no text (the form encoding the API documents), the file by its size,
  checked against the route's form schema with a JSON Schema validator. A
  "valid" form that is invalid on the wire, or whose file is not an image
  Pillow can decode, may be refused; an "invalid" form that is valid on the
  wire may be accepted. Neither is a failure.

- a valid request to an Open Inference Protocol model route names a model the
  app serves (``text``) and, where the route takes one, the version it serves
  (a random name is rightly a 404); a valid inference request gets a real
  tensor for it (which inputs a model takes is in its metadata, not in the
  OpenAPI schema, so a generated one is rightly a 400).
- a valid request to an OpenAI route names the model that serves it (``llm``
  or ``text``), and a generation is kept short: at most ``FUZZ_TOKENS`` new
  tokens, ``FUZZ_MESSAGES`` messages of ``FUZZ_CHARS`` characters. The token
  limits (``max_tokens`` and prompt tokens against the deployment's caps)
  are the deployment's configuration, not the schema's, so a generated value
  over them is rightly a 400; and a fuzzing run of full-length answers would
  take hours. An image part gets a real photo as its data URL; only the
  first image of a chat is kept, and only in a user message (the limits on
  images in a chat are in the schema's descriptions, not its rules), the
  others become text parts. A description, likewise, is kept to
  ``FUZZ_TOKENS`` tokens. A score's ``text_1`` pairs with its ``text_2``: a
  list of several that is not as long as ``text_2`` keeps its first (one for
  every ``text_2``; which lengths pair is the route's rule, not the schema's).
- a valid chat's fields agree with one another as the route requires beyond the schema: ``top_logprobs``
  comes with ``logprobs``, a ``tool_choice`` with ``tools`` (and a named one names one of them), a
  ``response_format`` other than text not with tools, ``tool_calls`` only in assistant messages and a
  ``tool`` message only after the call it answers, ``guided_regex`` not with a ``response_format``; its
  first ``FUZZ_MESSAGES`` tools are kept, their descriptions to ``FUZZ_CHARS``. A generated JSON schema,
  tool or ``guided_regex`` the grammar engine cannot enforce is rightly a 400 that names it ("cannot be
  enforced"); so is a prompt that the tools' listed schemas take over the deployment's token limit
  (``context_length_exceeded``, as for ``max_tokens``). Any other answer to them (a 500, a hang) stands.
- a valid request's ``concepts`` are concepts the knowledge graph holds, and its ``policy`` one the service
  is configured with: which words are WordNet nouns and which policies exist is data and configuration, not
  schema, so a generated name is rightly a 422.
- a valid explanation names a class the vision model has (``label`` of an image), or one of the request's
  ``labels`` (of a text); a text to explain keeps its first ``max_explain_words`` words; and Integrated
  Gradients runs at most ``FUZZ_STEPS`` steps (up to 64 are valid, seconds each here). The v2 explain
  route gets the text explainer's tensors.

- a valid request to a speech route names its model (``asr``, ``tts``) and the voice the service has
  (``joe``); its audio is a real recording of one second (``CLIP``: base64 in JSON, a file in a form), its
  ``language`` one the recogniser knows (``en``: which codes exist is the served model's, as its metadata
  says, not the schema's), a text to say is kept to ``FUZZ_CHARS`` characters and an answer to
  ``FUZZ_TOKENS`` tokens. A form's audio is judged valid on the wire when it decodes (as an image is when
  Pillow decodes it).

Every other failure stands.
"""

import base64
import functools
import io
import json
import os
import re
import wave

import httpx
import jsonschema_rs
import schemathesis
import skimage.data
from PIL import Image
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.transport.serialization import Binary

from api.policy import declared_routes
from deployments.audio import decode_audio
from deployments.errors import MaasError
from deployments.settings import limits
from knowledge.rules import NAME_PATTERN

MULTIPART = "multipart/form-data"


def _photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).resize((120, 80)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


PHOTO = _photo()
PHOTO_URL = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()


def _clip() -> bytes:
    """One second of a real recording (LibriVox read speech, Debian's pocketsphinx-testdata), as a WAV file."""
    source = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav"
    with wave.open(source) as reader, io.BytesIO() as out:
        with wave.open(out, "wb") as writer:
            writer.setparams(reader.getparams())
            writer.writeframes(reader.readframes(reader.getframerate()))
        return out.getvalue()


CLIP = _clip()
ASK = "/v1/multimodal/ask"
VOICE, LANGUAGE = "joe", "en"
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


OIP_MODEL = "text"
OIP_INFER = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fuzzing the protocol"]}]}
OIP_LABELS = {"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["testing", "cooking"]}
OIP_EXPLAIN = {"inputs": [*OIP_INFER["inputs"], OIP_LABELS]}


@functools.cache
def _served_version() -> str:
    url = os.environ["MAAS_FUZZ_APP_URL"]
    return httpx.get(f"{url}/v2/models/{OIP_MODEL}", timeout=30).json()["versions"][0]


# The model each OpenAI route serves, as its policy declares it (a request must name it).
OPENAI_MODELS = {
    path: policy.models[0] for path, policy in declared_routes().items() if policy.family == "openai" and policy.models
}
FUZZ_TOKENS, FUZZ_MESSAGES, FUZZ_CHARS = 2, 4, 40
SPEECH_MODELS = {path: model for path, model in OPENAI_MODELS.items() if model in ("asr", "tts")}
CONCEPTS = ["beverage", "animal", "n00001740", "dog.n.01", "vehicle", "food", "cup", "device", "plant", "tabby",
            "bird", "fish", "car", "weapon", "container", "structure", "mammal", "tool"]  # fmt: skip
CLASSES = ["espresso", "cup", "tabby", "Egyptian cat", "coffee mug", "rocket", "pizza", "golden retriever"]
FUZZ_STEPS = 4
EXPLAIN_WORDS = re.compile(r"\s*\S+")
POLICY = "confidence-gate"  # never blocks: a photo of coffee, and any text, pass it
POLICY_NAME = re.compile(NAME_PATTERN)


def _known_names(body: dict) -> dict:
    """The body with generated concept and policy names replaced by ones the service knows, and nothing else
    changed: as many items, equal where they were equal, invalid ones (too long, blank, not text) kept."""
    if isinstance(body.get("concepts"), list):
        valid = [v for v in body["concepts"] if isinstance(v, str) and 0 < len(v) <= 100 and not v.isspace()]
        known = {value: CONCEPTS[i % len(CONCEPTS)] for i, value in enumerate(dict.fromkeys(valid))}
        body = {**body, "concepts": [known.get(v, v) if isinstance(v, str) else v for v in body["concepts"]]}
    if "policy" in body and body["policy"] is None:
        body = {k: v for k, v in body.items() if k != "policy"}  # null is absent; a form would send "null"
    elif isinstance(body.get("policy"), str) and POLICY_NAME.match(body["policy"]):
        body = {**body, "policy": POLICY}
    return body


DESCRIBE = "/v1/multimodal/describe"


def _explainable(path: str, body: dict) -> dict:
    """An explanation request the service can answer: see the module's docstring."""
    body = dict(body)
    if path == "/v1/vision/explain":
        if isinstance(body.get("label"), str) and body["label"].strip():
            body["label"] = CLASSES[len(body["label"]) % len(CLASSES)]
        if isinstance(body.get("steps"), int) and not isinstance(body["steps"], bool):
            body["steps"] = min(body["steps"], FUZZ_STEPS)
        elif isinstance(body.get("steps"), str) and body["steps"].isdigit():  # a form's text
            body["steps"] = str(min(int(body["steps"]), FUZZ_STEPS))
    elif path == "/v1/text/explain":
        if isinstance(body.get("text"), str):
            body["text"] = "".join(EXPLAIN_WORDS.findall(body["text"])[:64]) or body["text"]
        labels = body.get("labels")
        if body.get("label") is not None and isinstance(labels, list) and labels and body["label"] not in labels:
            body["label"] = labels[0]
    return body


SCORE = "/v1/score"


def _paired(body: dict) -> dict:
    """A score request whose ``text_1`` pairs with its ``text_2``: see the module's docstring."""
    text_1, text_2 = body.get("text_1"), body.get("text_2")
    seconds = len(text_2) if isinstance(text_2, list) else 1
    if isinstance(text_1, list) and len(text_1) not in (1, seconds):
        body["text_1"] = text_1[:1]
    return body


def _short(text):
    return text[:FUZZ_CHARS] if isinstance(text, str) else text


def _short_generation(body: dict) -> dict:
    body = {**body, "model": OPENAI_MODELS["/v1/chat/completions"]}
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), (int, float)) and not isinstance(body[field], bool):
            body[field] = min(body[field], FUZZ_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = FUZZ_TOKENS  # not the deployment's default of 256, tens of seconds here
    if isinstance(body.get("prompt"), str):
        body["prompt"] = _short(body["prompt"])
    elif isinstance(body.get("prompt"), list):
        body["prompt"] = [_short(p) for p in body["prompt"]]
    if isinstance(body.get("messages"), list):
        messages, images = [], 0
        for message in body["messages"][:FUZZ_MESSAGES]:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content[:FUZZ_MESSAGES]:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        if images or message.get("role") != "user":
                            part = {"type": "text", "text": "an image was here"}
                        else:
                            images += 1
                            part = {**part, "image_url": {**part.get("image_url", {}), "url": PHOTO_URL}}
                    elif isinstance(part, dict):
                        part = {**part, "text": _short(part.get("text"))}
                    parts.append(part)
                content = parts
            messages.append({**message, "content": _short(content)})
        body["messages"] = messages
    return _consistent_chat(body)


def _short_tool(tool):
    """A tool whose description is kept to ``FUZZ_CHARS``, as a message's text is: the tools are listed in the
    prompt, whose length in tokens the deployment bounds."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if isinstance(function, dict) and isinstance(function.get("description"), str):
        return {**tool, "function": {**function, "description": _short(function["description"])}}
    return tool


def _consistent_chat(body: dict) -> dict:
    """A chat whose fields agree with one another, as the route's rules (not the schema) require: see the
    module's docstring."""
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    if body.get("guided_regex") is not None:
        body.pop("response_format", None)
    if isinstance(body.get("tools"), list):
        body["tools"] = [_short_tool(tool) for tool in body["tools"][:FUZZ_MESSAGES]]
    tools = body.get("tools") if isinstance(body.get("tools"), list) else None
    names = [t["function"]["name"] for t in tools or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = body.get("tool_choice")
    if choice is not None and not names:
        body.pop("tool_choice")
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        body["tool_choice"] = {**choice, "function": {**choice["function"], "name": names[0]}}
    if names and body.get("tool_choice") != "none" and isinstance(body.get("response_format"), dict):
        body.pop("response_format")
    if isinstance(body.get("messages"), list):
        called, messages = set(), []
        for message in body["messages"]:
            if not isinstance(message, dict):
                messages.append(message)
                continue
            message = dict(message)
            if message.get("role") != "assistant":
                message.pop("tool_calls", None)
            called.update(c.get("id") for c in message.get("tool_calls") or () if isinstance(c, dict))
            if message.get("role") == "tool" and message.get("tool_call_id") not in called:
                message["role"] = "user"
            if message.get("role") != "tool":
                message.pop("tool_call_id", None)
            if message.get("content") is None and not message.get("tool_calls"):
                message["content"] = ""
            messages.append(message)
        body["messages"] = messages
    return body


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    path = case.operation.path
    if isinstance(case.body, dict):
        case.body = _known_names(case.body)
    if isinstance(case.body, dict) and (path in SPEECH_MODELS or path == ASK):
        case.body = _speakable(path, case)
        if path in SPEECH_MODELS:
            return
    if path in OPENAI_MODELS and isinstance(case.body, dict):
        if OPENAI_MODELS[path] == "llm":
            case.body = _short_generation(case.body)
        else:
            case.body = {**case.body, "model": OPENAI_MODELS[path]}
            if path == SCORE:
                case.body = _paired(case.body)
        return
    if case.path_parameters and "model_name" in case.path_parameters:
        served = {"model_name": OIP_MODEL}
        if "model_version" in case.path_parameters:
            served["model_version"] = _served_version()
        case.path_parameters = {**case.path_parameters, **served}
        if case.operation.path.endswith(("/infer", "/explain")):
            request_id = case.body.get("id") if isinstance(case.body, dict) else None
            tensors = OIP_INFER if case.operation.path.endswith("/infer") else OIP_EXPLAIN
            case.body = {**tensors, **({"id": request_id} if isinstance(request_id, str) else {})}
        return
    if path in ("/v1/vision/explain", "/v1/text/explain") and isinstance(case.body, dict):
        case.body = _explainable(path, case.body)
    if not isinstance(case.body, dict) or "image" not in case.body:
        return
    photo = base64.b64encode(PHOTO).decode() if case.media_type == "application/json" else PHOTO
    case.body = {**case.body, "image": photo}  # a new dict: cases can share theirs
    if path == DESCRIBE:
        case.body["max_tokens"] = FUZZ_TOKENS  # a description of FUZZ_TOKENS tokens: seconds less per case


UNENFORCEABLE = re.compile(r"^(response_format\.json_schema\.schema|tools|guided_regex)$")


@schemathesis.hook
def filter_failure(ctx, failure, case, response) -> bool:
    """False to drop a failure on a multipart form that is only one because of how it was judged (see above),
    and the refusal of a generated JSON schema, tool or regex that the grammar engine cannot enforce: a 400
    naming it is the documented answer, and which schemas an engine enforces is not in any schema."""
    if isinstance(failure, RejectedPositiveData) and response is not None and response.status_code == 400:
        error = _json(response.content.decode(errors="replace")) or {}
        error = (error.get("error") or {}) if isinstance(error, dict) else {}
        if UNENFORCEABLE.match(str(error.get("param"))):
            return "cannot be enforced" not in error.get("message", "")
        if error.get("code") == "context_length_exceeded" and isinstance(case.body, dict) and case.body.get("tools"):
            return False  # the tools' schemas, listed in the prompt, took it over the deployment's token limit
    if case.media_type != MULTIPART or not isinstance(case.body, dict):
        return True
    if isinstance(failure, RejectedPositiveData):
        files = (case.body.get("image"), case.body.get("audio"), case.body.get("file"))
        return _valid_on_wire(case) and _decodes(files[0]) and all(_plays(f) for f in files[1:])
    if isinstance(failure, AcceptedNegativeData):
        return not _valid_on_wire(case)
    return True


def _valid_on_wire(case) -> bool:
    body = case.operation.get_body_for_media_type(MULTIPART)
    return jsonschema_rs.validator_for(body.raw_schema).is_valid(wire_form(case.body, body.raw_schema))


def wire_form(fields: dict, schema: dict) -> dict:
    """A generated form as the server reads it: text fields as sent, other fields' text read as JSON, files by size."""
    form = {}
    for name, value in fields.items():
        if isinstance(value, (Binary, bytes)):
            form[name] = "x" * len(value.data if isinstance(value, Binary) else value)  # only its length matters
            continue
        texts = [_sent(item) for item in value] if isinstance(value, list) else [_sent(value)]
        if not texts:
            continue  # an empty list sends no field at all
        if _takes_text(schema["properties"].get(name, {})):
            form[name] = texts if _is_array(schema["properties"][name]) else texts[-1]
        else:
            form[name] = [_json(text) for text in texts] if len(texts) != 1 else _json(texts[0])
    return form


def _is_array(schema: dict) -> bool:
    """A repeated form field: an array, or an array or null (``concepts``)."""
    return schema.get("type") == "array" or any(_is_array(option) for option in schema.get("anyOf", ()))


def _sent(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _decodes(file) -> bool:
    if file is None:
        return True
    data = file.data if isinstance(file, Binary) else file.encode() if isinstance(file, str) else bytes(file)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # noqa: BLE001 - anything Pillow cannot decode
        return False
    return True


def _speakable(path: str, case) -> dict:
    """A speech request the service can answer in about a second: see the module's docstring."""
    body = dict(case.body)
    if path in SPEECH_MODELS:
        body["model"] = SPEECH_MODELS[path]
    audio_field = "file" if path in SPEECH_MODELS else "audio"
    if audio_field in body and path != "/v1/audio/speech":
        body[audio_field] = base64.b64encode(CLIP).decode() if case.media_type == "application/json" else CLIP
    if isinstance(body.get("language"), str) and LANGUAGE_CODE.fullmatch(body["language"]):
        body["language"] = LANGUAGE
    if isinstance(body.get("voice"), str) and body["voice"]:
        body["voice"] = VOICE
    if isinstance(body.get("input"), str):
        body["input"] = _short(body["input"])
    if path == ASK:
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = min(body["max_tokens"], FUZZ_TOKENS)
        elif isinstance(body.get("max_tokens"), str) and body["max_tokens"].isdigit():  # a form's text
            body["max_tokens"] = str(min(int(body["max_tokens"]), FUZZ_TOKENS))
        elif "max_tokens" not in body:
            body["max_tokens"] = FUZZ_TOKENS if case.media_type == "application/json" else str(FUZZ_TOKENS)
        if isinstance(body.get("text"), str):
            body["text"] = _short(body["text"])
    return body


def _plays(file) -> bool:
    """Whether an audio file decodes within the limits (a form's file judged as the server judges it)."""
    if file is None:
        return True
    data = file.data if isinstance(file, Binary) else file.encode() if isinstance(file, str) else bytes(file)
    try:
        decode_audio(data, limits())
    except MaasError:
        return False
    return True


def _takes_text(schema: dict) -> bool:
    if schema.get("type") == "array":
        return _takes_text(schema.get("items", {}))
    return schema.get("type") == "string" or any(_takes_text(option) for option in schema.get("anyOf", ()))
