"""API keys, scopes, rate limits and the audit trail, on the real app over a fake dataplane (no Ray)."""

import json

import pytest
import yaml

from api import keys as keys_module
from api.access import Guard
from api.audit import Audit
from api.keys import ApiKey, KeyFile, RateLimit, digest, read_keys
from api.limits import RateLimits, SharedLimits, TokenBucket, retry_after
from tests.unit.fake_dataplane import client

SECRET, OTHER, LLM_ONLY = "maas_secret-one", "maas_secret-two", "maas_secret-three"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class InProcessLimits(SharedLimits):
    """``SharedLimits`` over in-process buckets and a clock the test moves, with no actor."""

    def __init__(self, clock):
        super().__init__("unused")
        self.limits = self.local = RateLimits(clock)

    async def _call(self, method: str, *args):
        return getattr(self.local, method)(*args)


def entry(key_id: str, secret: str, **scopes) -> ApiKey:
    return ApiKey(id=key_id, sha256=digest(secret), **scopes)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def guard(clock):
    guard = Guard(InProcessLimits(clock))
    guard.configure(True, [
        entry("team-a", SECRET),
        entry("vision-only", OTHER, routes=["v1", "v2"], models=["vision"],
              rate_limit=RateLimit(requests_per_s=1, burst=2)),
        entry("chat", LLM_ONLY, routes=["openai"], models=["llm"],
              rate_limit=RateLimit(requests_per_s=100, tokens_per_minute=60)),
    ], None)  # fmt: skip
    return guard


@pytest.fixture
def api(dataplane, guard):
    return client(dataplane, guard=guard)


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


CLASSIFY = ("/v1/text/classify", {"text": "the quarterly invoice", "labels": ["finance", "sports"]})
CHAT = ("/v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hello there"}]})
INFER = ("/v2/models/text/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]})


def test_without_a_key_every_route_family_answers_401_in_its_own_shape_with_a_bearer_challenge(api):
    v1 = api.post(CLASSIFY[0], json=CLASSIFY[1])
    assert v1.status_code == 401 and v1.headers["WWW-Authenticate"] == 'Bearer realm="maas-cluster"'
    assert v1.json()["detail"][0]["type"] == "invalid_api_key"
    assert "Authorization: Bearer" in v1.json()["detail"][0]["msg"]
    openai = api.post(CHAT[0], json=CHAT[1])
    assert openai.status_code == 401
    assert (
        openai.json()["error"]["code"] == "invalid_api_key"
        and openai.json()["error"]["type"] == "invalid_request_error"
    )
    v2 = api.post(INFER[0], json=INFER[1])
    assert v2.status_code == 401 and isinstance(v2.json()["error"], str)
    assert api.get("/v1/models").status_code == 401 and api.get("/v2").status_code == 401
    assert api.get("/no/such/route").status_code == 401  # nothing about which routes exist


def test_a_wrong_key_or_another_scheme_is_an_invalid_token(api):
    wrong = api.post(CLASSIFY[0], json=CLASSIFY[1], headers=bearer("maas_not-a-key"))
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert "maas_not-a-key" not in wrong.text
    basic = api.post(CLASSIFY[0], json=CLASSIFY[1], headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401


def test_a_valid_key_is_served_and_health_and_the_api_description_stay_open(api):
    answer = api.post(CLASSIFY[0], json=CLASSIFY[1], headers=bearer(SECRET))
    assert answer.status_code == 200 and answer.json()["labels"][0]["label"] == "finance"
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/text/ready",
                 "/openapi.json"):  # fmt: skip
        assert api.get(path).status_code == 200, path
    assert api.get("/no/such/route", headers=bearer(SECRET)).status_code == 404


def test_a_key_without_the_route_family_or_the_model_gets_403(api):
    family = api.post(CHAT[0], json=CHAT[1], headers=bearer(OTHER))
    assert family.status_code == 403 and family.json()["error"]["code"] == "insufficient_scope"
    assert "'vision-only'" in family.json()["error"]["message"]
    model = api.post(CLASSIFY[0], json=CLASSIFY[1], headers=bearer(OTHER))
    assert model.status_code == 403 and "['text']" in model.json()["detail"][0]["msg"]
    assert 'error="insufficient_scope"' in model.headers["WWW-Authenticate"]
    v2 = api.post(INFER[0], json=INFER[1], headers=bearer(OTHER))
    assert v2.status_code == 403 and "text" in v2.json()["error"]
    assert api.post("/v2/models/vision/infer", json={"inputs": []}, headers=bearer(OTHER)).status_code != 403


def test_a_burst_over_the_limit_gets_429_with_retry_after_until_the_bucket_refills(api, clock):
    path, body = "/v2/models/vision/infer", {"inputs": []}
    statuses = [api.post(path, json=body, headers=bearer(OTHER)).status_code for _ in range(4)]
    assert statuses[:2] != [429, 429] and statuses[2:] == [429, 429]
    refused = api.post(path, json=body, headers=bearer(OTHER))
    assert refused.headers["Retry-After"] == "1" and "rate limit" in refused.json()["error"]
    clock.now += 1.0
    assert api.post(path, json=body, headers=bearer(OTHER)).status_code != 429
    assert api.post(CLASSIFY[0], json=CLASSIFY[1], headers=bearer(SECRET)).status_code == 200  # other keys unaffected


def test_language_model_tokens_are_charged_after_the_answer_and_the_debt_is_waited_out(api, clock):
    # 60 tokens a minute: one a second. The fake answer "you said hello there" costs 2 + 4 tokens.
    for _ in range(10):
        assert api.post(CHAT[0], json=CHAT[1], headers=bearer(LLM_ONLY)).status_code == 200
    refused = api.post(CHAT[0], json=CHAT[1], headers=bearer(LLM_ONLY))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) == 1  # 60 tokens spent, nothing owed: the next one comes in 1 s
    clock.now += 1.0
    assert api.post(CHAT[0], json={**CHAT[1], "stream": True}, headers=bearer(LLM_ONLY)).status_code == 200
    owed = api.post(CHAT[0], json=CHAT[1], headers=bearer(LLM_ONLY))
    assert owed.status_code == 429 and int(owed.headers["Retry-After"]) == 6  # 1 token held, 6 spent: 5 owed


def test_token_bucket_arithmetic():
    bucket = TokenBucket(rate=2.0, capacity=4.0, level=4.0, stamp=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.5) == 0.0
    bucket.owe(3, 0.5)
    assert bucket.wait(0.5) == pytest.approx(1.5, abs=1e-6) and bucket.wait(2.1) == 0.0
    assert retry_after(0.01) == 1 and retry_after(1.2) == 2


def test_keys_off_means_no_key_is_asked_for(dataplane):
    assert client(dataplane).post(CLASSIFY[0], json=CLASSIFY[1]).status_code == 200


def test_the_command_line_stores_only_hashes_and_a_file_change_adds_and_revokes_keys(tmp_path, dataplane, capsys):
    path = tmp_path / "keys.yaml"
    assert (
        keys_module.main(["add", "--file", str(path), "--id", "team-b", "--models", "text", "--requests-per-s", "5"])
        == 0
    )
    key = capsys.readouterr().out.strip()
    assert key.startswith("maas_") and len(key) > 40
    assert key not in path.read_text() and digest(key) in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    (stored,) = read_keys(path)
    assert stored.models == ("text",) and stored.rate_limit.requests_per_s == 5

    guard = Guard(None)
    guard.configure(True, [], str(path))
    guard.file.interval_s = 0.0
    api = client(dataplane, guard=guard)
    assert api.post(CLASSIFY[0], json=CLASSIFY[1], headers=bearer(key)).status_code == 200
    assert keys_module.main(["add", "--file", str(path), "--id", "team-b"]) == 2  # ids are unique
    assert keys_module.main(["revoke", "--file", str(path), "--id", "team-b"]) == 0
    assert api.post(CLASSIFY[0], json=CLASSIFY[1], headers=bearer(key)).status_code == 401

    path.write_text("keys: [{id: broken}]")  # a bad edit keeps the keys in force and says why
    guard.refresh()
    assert guard.file.error and "sha256" in guard.file.error and guard.keys is not None


def test_key_files_are_checked_with_errors_that_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="cannot read the key file"):
        KeyFile(tmp_path / "missing.yaml")
    twice = {"keys": [entry("a", SECRET).model_dump(mode="json"), entry("a", OTHER).model_dump(mode="json")]}
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(twice))
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        read_keys(tmp_path / "twice.yaml")


def test_the_audit_line_names_the_key_route_and_sizes_and_never_the_payload(tmp_path, dataplane, guard):
    audit = Audit()
    audit.configure(True, str(tmp_path), 1_000_000, 2, "replica-1")
    api = client(dataplane, guard=guard, audit=audit)
    canary = "canary-7f3a9c both secret and personal"
    api.post(CLASSIFY[0], json={"text": canary, "labels": ["finance", "sports"]}, headers=bearer(SECRET))
    api.post(CHAT[0], json=CHAT[1], headers=bearer(OTHER))
    api.post(CHAT[0], json=CHAT[1], headers=bearer(LLM_ONLY))
    text = (tmp_path / "maas-audit-replica-1.jsonl").read_text()
    assert canary not in text and SECRET not in text and "hello there" not in text
    served, refused, chat = [json.loads(line) for line in text.splitlines()]
    assert served["key_id"] == "team-a" and served["route"] == "/v1/text/classify" and served["models"] == ["text"]
    assert served["status"] == 200 and served["bytes_in"] > len(canary) and served["bytes_out"] > 0
    assert refused["key_id"] == "vision-only" and refused["status"] == 403
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (2, 4)
    assert set(served) >= {"time", "method", "latency_ms", "masked"}
