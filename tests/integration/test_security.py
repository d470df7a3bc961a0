"""API keys on the running app: every protocol refuses without a key, scopes and limits hold across both
ingress replicas, keys are revoked without a restart, and each request leaves one audit line.

The module turns keys on with a live change of the ingress's ``user_config`` (a key file, as a Kubernetes
Secret would be mounted) and turns them off again after, so the other modules see the shipped app.
"""

import base64
import contextlib
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from api import keys as key_file
from monitoring.metrics import KEY_METRICS
from tests import serving
from tests.integration.conftest import deploy, shipped_config

KEYS = {  # id: the command line's arguments
    "full": [],
    "vision": ["--routes", "v1", "v2", "--models", "vision"],
    "burst": ["--requests-per-s", "0.05", "--burst", "4"],
    "tokens": ["--routes", "openai", "--models", "llm", "--requests-per-s", "10", "--tokens-per-minute", "20"],
    "revoked": [],
    "masked": ["--mask"],
    "chat": ["--routes", "openai", "--models", "llm"],
    "audio": ["--requests-per-s", "10", "--audio-seconds-per-minute", "6"],
}
SENTENCE = (
    "Please send the invoice to John Smith at john.smith@example.com or call +1 415 555 0132; "
    "he paid with card 4111 1111 1111 1111."
)
MASKED = "Please send the invoice to [PERSON] at [EMAIL] or call [PHONE]; he paid with card [CARD]."


def add_key(path, key_id: str, args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert key_file.main(["add", "--file", str(path), "--id", key_id, *args]) == 0
    return out.getvalue().strip()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def refused_without_key(client) -> bool:
    """True once both ingress replicas refuse a request without a key (several asks reach both)."""
    return all(client.get("/v1/models").status_code == 401 for _ in range(6))


@pytest.fixture(scope="module")
def keys(app_url, client, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("keys")
    path = folder / "api_keys.yaml"
    secrets = {key_id: add_key(path, key_id, args) for key_id, args in KEYS.items()}
    config = shipped_config()
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    ingress["user_config"]["security"] = {
        "api_keys": {"required": True, "file": str(path)},
        "masking": {"mode": "keys"},  # the texts of keys with mask: true
    }
    deploy(config, folder / "secured.yaml")
    deadline = time.monotonic() + 60
    while not refused_without_key(client):
        assert time.monotonic() < deadline, "keys not required 60 s after the change"
        time.sleep(0.5)
    yield secrets | {"file": path}
    deploy(shipped_config(), folder / "shipped.yaml")
    deadline = time.monotonic() + 60
    while not all(client.get("/v1/models").status_code == 200 for _ in range(6)):
        assert time.monotonic() < deadline, "keys still required 60 s after turning them off"
        time.sleep(0.5)


def test_every_route_family_refuses_no_key_a_wrong_key_and_a_key_without_the_scope(client, keys, chelsea_jpeg):
    image = base64.b64encode(chelsea_jpeg).decode()
    requests = {
        "/v1/vision/classify": ({"image": image}, "detail"),
        "/v1/text/classify": ({"text": "an invoice", "labels": ["finance", "sports"]}, "detail"),
        "/v1/chat/completions": ({"model": "llm", "messages": [{"role": "user", "content": "hi"}]}, "error"),
        "/v1/embeddings": ({"model": "text", "input": "hi"}, "error"),
        "/v2/models/text/infer": ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]},
                                  "error"),
    }  # fmt: skip
    for path, (body, shape) in requests.items():
        missing = client.post(path, json=body)
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert shape in missing.json(), (path, missing.text)
        wrong = client.post(path, json=body, headers=auth("maas_" + "x" * 43))
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"], path
    scoped = client.post("/v1/text/classify", json=requests["/v1/text/classify"][0], headers=auth(keys["vision"]))
    assert scoped.status_code == 403, scoped.text
    assert (
        scoped.json()["detail"][0]["msg"]
        == "the API key 'vision' may not use route family 'v1' and the models ['text']"
    )
    chat = client.post("/v1/chat/completions", json=requests["/v1/chat/completions"][0], headers=auth(keys["vision"]))
    assert chat.status_code == 403 and chat.json()["error"]["code"] == "insufficient_scope"
    allowed = client.post("/v1/vision/classify", json={"image": image}, headers=auth(keys["vision"]))
    assert allowed.status_code == 200 and allowed.json()["labels"][0]["label"] in {"tabby", "tiger cat", "Egyptian cat"}
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/vision/ready"):
        assert client.get(path).status_code == 200, path


def test_the_openai_and_triton_clients_send_the_key_unchanged(app_url, keys):
    with openai.OpenAI(base_url=f"{app_url}/v1", api_key=keys["full"], timeout=120, max_retries=0) as client:
        vectors = client.embeddings.create(model="text", input=["an invoice", "a football match"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384
    with openai.OpenAI(base_url=f"{app_url}/v1", api_key="maas_wrong", timeout=120, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError, match="the API key is not valid"):
            client.models.list()

    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(["the quarterly invoice"], dtype=np.object_))
    server = triton.InferenceServerClient(url=app_url.removeprefix("http://"), network_timeout=60)
    try:
        result = server.infer("text", [tensor], headers=auth(keys["full"]))
        assert result.as_numpy("embedding").shape == (1, 384)
        with pytest.raises(InferenceServerException, match="an API key is required"):
            server.infer("text", [tensor])
    finally:
        server.close()


def test_a_key_without_the_speech_models_is_refused_on_the_audio_routes(client, keys, librivox):
    chat_only = auth(keys["chat"])
    heard = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", librivox[1].wav)}, data={"model": "asr"},
                        headers=chat_only)  # fmt: skip
    assert heard.status_code == 403 and heard.json()["error"]["code"] == "insufficient_scope"
    said = client.post("/v1/audio/speech", json={"model": "tts", "voice": "joe", "input": "Hi."}, headers=chat_only)
    assert said.status_code == 403 and "'tts'" in said.json()["error"]["message"]
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(librivox[1].wav).decode(), "format": "wav"}}
    spoken = {"model": "llm", "max_tokens": 4, "messages": [{"role": "user", "content": [part]}]}
    refused = client.post("/v1/chat/completions", json=spoken, headers=chat_only)
    assert refused.status_code == 403 and "['asr']" in refused.json()["error"]["message"]
    written = {"model": "llm", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=written, headers=chat_only).status_code == 200


def test_audio_seconds_are_charged_to_the_key_and_written_in_its_audit_line(client, keys, librivox):
    clip = librivox[0]  # 7.1 s; the key may hear 6 s a minute
    form = {"model": "asr", "language": "en"}
    first = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", clip.wav)}, data=form,
                        headers=auth(keys["audio"]))  # fmt: skip
    assert first.status_code == 200, first.text
    second = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", clip.wav)}, data=form,
                         headers=auth(keys["audio"]))  # fmt: skip
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(second.headers["Retry-After"]) == pytest.approx((7.1 - 6) * 10, abs=2)  # 1.1 s owed at 0.1 s/s
    line = audit_line("audio", lambda line: line["status"] == 200)
    assert line["audio_seconds"] == 7.1 and line["models"] == ["asr"]


def test_a_masked_keys_transcript_and_speech_are_masked(client, keys):
    speech = {"model": "tts", "voice": "joe", "response_format": "wav"}
    said = client.post(
        "/v1/audio/speech", json=speech | {"input": "My name is John Smith."}, headers=auth(keys["full"])
    )
    assert said.status_code == 200

    def transcript(key: str, audio: bytes) -> tuple[str, dict]:
        answer = client.post("/v1/audio/transcriptions", files={"file": ("said.wav", audio)},
                             data={"model": "asr", "language": "en"}, headers=auth(keys[key]))  # fmt: skip
        assert answer.status_code == 200, answer.text
        return answer.json()["text"], answer.headers

    plain, _ = transcript("full", said.content)
    assert "John Smith" in plain
    masked, headers = transcript("masked", said.content)
    assert "[PERSON]" in masked and "John" not in masked and headers["x-maas-masked"] == "person=1"
    # What a masked key asks to be said is masked before the voice says it.
    spoken = client.post("/v1/audio/speech", json=speech | {"input": "Please call John Smith today."},
                         headers=auth(keys["masked"]))  # fmt: skip
    heard, _ = transcript("full", spoken.content)
    assert "john" not in heard.lower() and "person" in heard.lower(), heard


def audit_lines(key_id: str, count: int, where=lambda line: True) -> dict[str, list[dict]]:
    """Each ingress replica's audit lines for one key (those ``where`` keeps), by file, once there are ``count``.

    A line is written once the answer's last byte is sent, so the client can read the file before it is there.
    """
    deadline = time.monotonic() + 10
    while True:
        found = {}
        for path in (serving.session_logs_dir() / "serve").glob("maas-audit-*.jsonl"):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            found[path.name] = [line for line in lines if line["key_id"] == key_id and where(line)]
        found = {name: lines for name, lines in found.items() if lines}
        seen = sum(len(lines) for lines in found.values())
        if seen >= count or time.monotonic() > deadline:
            assert seen == count, f"{seen} audit line(s) for key {key_id!r}, expected {count}"
            return found


def audit_line(key_id: str, where) -> dict:
    """The one audit line for the key that ``where`` keeps."""
    (line,) = [line for lines in audit_lines(key_id, 1, where).values() for line in lines]
    return line


def test_a_burst_over_the_limit_gets_429_and_the_limit_holds_across_both_ingress_replicas(app_url, keys):
    # 4 requests at once, then one every 20 s: of 16 sent together, 4 pass whichever replica each reaches.
    with httpx.Client(base_url=app_url, timeout=60, headers=auth(keys["burst"])) as http:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: http.get("/v1/models"), range(16)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * 4 + [429] * 12, statuses
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    per_replica = audit_lines("burst", 16)
    assert len(per_replica) == 2, f"the requests reached {len(per_replica)} ingress replica(s)"


def test_language_model_tokens_per_minute_are_charged_after_the_answer(app_url, keys):
    chat = {"model": "llm", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    with httpx.Client(base_url=app_url, timeout=120, headers=auth(keys["tokens"])) as http:
        first = http.post("/v1/chat/completions", json=chat)
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        assert used > 20  # the prompt alone is more than the key's 20 tokens a minute
        second = http.post("/v1/chat/completions", json=chat)
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    # The debt (used - 20 tokens) is repaid at 20 a minute.
    assert int(second.headers["Retry-After"]) == pytest.approx((used - 20) * 3, abs=2)


def test_a_revoked_key_is_refused_within_seconds_without_a_restart(client, keys):
    before = serving.replica_actors("Ingress")
    assert client.get("/v1/models", headers=auth(keys["revoked"])).status_code == 200
    with contextlib.redirect_stderr(io.StringIO()):
        assert key_file.main(["revoke", "--file", str(keys["file"]), "--id", "revoked"]) == 0
    deadline = time.monotonic() + 10
    while not all(client.get("/v1/models", headers=auth(keys["revoked"])).status_code == 401 for _ in range(6)):
        assert time.monotonic() < deadline, "the revoked key still served 10 s after the file changed"
        time.sleep(0.2)
    assert client.get("/v1/models", headers=auth(keys["full"])).status_code == 200
    assert serving.replica_actors("Ingress") == before


def test_each_request_has_an_audit_line_and_key_metrics_count_refusals_by_reason(client, keys):
    assert (
        client.post("/v1/embeddings", json={"model": "text", "input": "x"}, headers=auth(keys["vision"])).status_code
        == 403
    )
    line = audit_line("vision", lambda line: line["route"] == "/v1/embeddings")
    assert line["status"] == 403 and line["models"] == ["text"] and line["method"] == "POST"
    assert line["bytes_in"] == 0 and line["bytes_out"] > 0  # refused before its body was read
    for path in (serving.session_logs_dir() / "serve").glob("maas-audit-*.jsonl"):
        text = path.read_text()
        assert not any(secret in text for name, secret in keys.items() if name != "file")
    wanted = ("ray_maas_api_key_refusals_total{", 'key_id="vision"', 'reason="insufficient_scope"')
    deadline = time.monotonic() + 30
    while not any(all(part in row for part in wanted) for row in serving.metrics_exposition().splitlines()):
        assert time.monotonic() < deadline, "no refusal counted for key 'vision' in the metrics"
        time.sleep(1)
    exposition = serving.metrics_exposition()
    assert 'key_id="maas_' not in exposition
    # The dashboard's Access row queries these; they exist only while keys are on (test_monitoring skips them).
    assert all(f"{name}{{" in exposition for name in KEY_METRICS), [n for n in KEY_METRICS if n not in exposition]
    tokens = [row for row in exposition.splitlines() if row.startswith("ray_maas_api_key_tokens_total{")]
    labels = [re.findall(r'(key_id|kind|replica)="([^"]*)"', row) + [row.rsplit(" ", 1)[-1]] for row in tokens]
    assert any('key_id="tokens"' in row and 'kind="prompt"' in row for row in tokens), labels


def test_a_masked_keys_text_reaches_the_model_masked_and_the_response_counts_each_kind(client, keys):
    masked = client.post("/v1/text/embed", json={"texts": [SENTENCE]}, headers=auth(keys["masked"]))
    assert masked.status_code == 200 and masked.headers["x-maas-masked"] == "card=1,email=1,person=1,phone=1"
    placeholder = client.post("/v1/text/embed", json={"texts": [MASKED]}, headers=auth(keys["full"]))
    original = client.post("/v1/text/embed", json={"texts": [SENTENCE]}, headers=auth(keys["full"]))
    assert "x-maas-masked" not in original.headers  # keys without mask: true are not masked
    vector, seen, raw = (np.array(r.json()["embeddings"][0]) for r in (masked, placeholder, original))
    assert np.allclose(vector, seen, atol=1e-5) and not np.allclose(vector, raw, atol=1e-3)
    explained = client.post("/v1/text/explain", json={"text": SENTENCE, "labels": ["finance", "sports"]},
                            headers=auth(keys["masked"]))  # fmt: skip
    assert explained.status_code == 200 and "John" not in explained.text and "[PERSON]" in explained.text
    line = audit_line("masked", lambda line: line["route"] == "/v1/text/embed")
    assert line["masked"] == {"card": 1, "email": 1, "person": 1, "phone": 1}


def test_the_language_models_answer_is_masked_for_a_masked_key(client, keys):
    # Greedy, the model goes on "... a woman named Sarah, who has been working at the company for 15".
    completion = {"model": "llm", "prompt": "The CEO of the company is", "temperature": 0, "max_tokens": 16}
    plain = client.post("/v1/completions", json=completion, headers=auth(keys["full"]))
    assert "Sarah" in plain.json()["choices"][0]["text"], plain.text
    masked = client.post("/v1/completions", json=completion, headers=auth(keys["masked"]))
    text = masked.json()["choices"][0]["text"]
    assert "[PERSON]" in text and "Sarah" not in text and masked.headers["x-maas-masked"] == "person=1", text
    streamed = client.post("/v1/completions", json=completion | {"stream": True}, headers=auth(keys["masked"]))
    assert "[PERSON]" in streamed.text and "Sarah" not in streamed.text
