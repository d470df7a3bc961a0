"""Rollouts without Ray: the configuration's errors, the sticky split, the judge's decisions, and how a request is
routed, counted, copied in shadow mode and answered when the candidate fails."""

import asyncio
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from pydantic import ValidationError

from api.access import rollout_caller
from api.keys import ApiKey, digest
from deployments.contracts import OcrLine, OcrResult, TextEmbeddings, TextRanking, TextScores
from deployments.errors import Forbidden, InvalidInput
from deployments.ingress import IngressConfig
from pipelines import usage
from pipelines.judging import Judge, Window, psi, rank_correlation
from pipelines.rollouts import Rollout, Rollouts, Routed, bucket, compare, confidence


def refused(config: dict) -> str:
    with pytest.raises(ValidationError) as error:
        IngressConfig.model_validate({"rollouts": config})
    return str(error.value)


def test_configuration_errors_name_the_field():
    assert "rollouts.vision.weight" in refused({"vision": {"candidate": "c", "mode": "canary", "weight": 120}})
    assert "models without variants ['fusion']" in refused({"fusion": {"candidate": "c"}})
    assert "rollouts.tts.mode: shadow compares the answers" in refused({"tts": {"candidate": "c", "mode": "shadow"}})
    assert "rollouts.vision.policy.criteria.max_latency" in refused(
        {"vision": {"candidate": "c", "policy": {"criteria": {"max_latency": 1}}}}
    )
    assert "the last step must be 100" in refused({"vision": {"candidate": "c", "policy": {"steps": [5, 50]}}})
    assert "rollouts.vision.candidate" in refused({"vision": {"mode": "shadow"}})
    assert "rollouts.vision.mode" in refused({"vision": {"candidate": "c", "mode": "blue-green"}})


def test_the_split_is_sticky_per_caller_and_gives_the_weight():
    callers = [f"caller-{i}" for i in range(4000)]
    share = sum(bucket("vision", caller) < 20 for caller in callers) / len(callers)
    assert 0.18 < share < 0.22
    assert all(bucket("vision", caller) == bucket("vision", caller) for caller in callers[:50])
    assert bucket("vision", "caller-1") != bucket("text", "caller-1")  # each model splits on its own


def test_pinning_needs_the_admin_scope_with_keys_on():
    admin = ApiKey(id="ops", sha256=digest("a"), routes=["admin", "v1"])
    everything = ApiKey(id="all", sha256=digest("b"))
    user = ApiKey(id="team", sha256=digest("c"), routes=["v1"])
    pin = {"headers": [(b"x-maas-variant", b"Candidate")]}
    assert rollout_caller(pin, admin, keys_on=True) == ("ops", "candidate")
    assert rollout_caller(pin, everything, keys_on=True) == ("all", "candidate")
    with pytest.raises(Forbidden, match="admin scope"):
        rollout_caller(pin, user, keys_on=True)
    assert rollout_caller(pin, None, keys_on=False) == (None, "candidate")
    with pytest.raises(InvalidInput, match="stable, candidate"):
        rollout_caller({"headers": [(b"x-maas-variant", b"v2")]}, None, keys_on=False)
    assert rollout_caller({"headers": [(b"x-maas-caller", b"tenant-7")]}, None, keys_on=False) == ("tenant-7", None)
    assert rollout_caller({"headers": [(b"x-maas-caller", b"tenant-7")]}, user, keys_on=True) == ("team", None)


# --- the judge -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def window(requests: int, confidence: float = 0.7, seconds: float = 0.02, errors: int = 0, agree: int = 0) -> dict:
    counts = Window()
    for _ in range(requests):
        counts.answered(seconds, confidence)
    for _ in range(errors):
        counts.failed()
    for _ in range(agree):
        counts.compare(True, 1.0)
    return counts.as_dict()


def canary(**policy) -> Rollout:
    policy = {"steps": [10, 50, 100], "min_requests": 20, "interval_s": 1, **policy}
    return Rollout(candidate="vision-candidate", mode="canary", weight=10, policy=policy)


def judged(judge: Judge, clock: Clock, rollout: Rollout, stable: dict, candidate: dict) -> list[dict]:
    judge.record("vision", rollout, {"stable": stable, "candidate": candidate}, ready=True)
    clock.now += 1
    return judge.evaluate()


def test_the_judge_promotes_an_equal_candidate_step_by_step():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    assert judge.serving() == {"vision": {"mode": "canary", "weight": 10}}
    assert judged(judge, clock, rollout, window(50), window(10)) == []  # under min_requests: no decision
    steps = [judged(judge, clock, rollout, window(50), window(20)) for _ in range(3)]
    assert [d[0]["decision"] for d in steps] == ["step", "step", "promoted"]
    assert [d[0]["to_weight"] for d in steps] == [50, 100, 100]
    assert judge.serving() == {"vision": {"mode": "canary", "weight": 100}}
    assert judged(judge, clock, rollout, window(0), window(50)) == []  # promoted is final


def test_a_new_judge_goes_on_from_where_the_saved_one_stood():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    judge.record("vision", rollout, {}, ready=True, version="2")
    judged(judge, clock, rollout, window(50), window(20, confidence=0.2))  # rolled back on its confidence
    saved = json.loads(json.dumps(judge.saved()))  # what the key-value store keeps

    again = Judge(clock)
    again.restore("vision", Rollout.model_validate(saved["vision"]["config"]), saved["vision"])
    again.configure("vision", rollout, configured_at=5.0)  # the ingress reports the same configuration
    again.record("vision", rollout, {}, ready=True, version="2")  # and the same candidate version
    assert again.serving() == {"vision": {"mode": "off", "weight": 0.0}}
    shown = again.describe()["vision"]
    assert shown["status"] == "rolled_back" and shown["decisions"] == judge.describe()["vision"]["decisions"]
    again.record("vision", rollout, {}, ready=True, version="3")  # a new candidate version starts it again
    assert again.serving() == {"vision": {"mode": "canary", "weight": 10}}


def test_the_judge_rolls_back_a_drifted_candidate_with_the_failing_criterion_as_reason():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    (decision,) = judged(judge, clock, rollout, window(100, confidence=0.7), window(20, confidence=0.88))
    assert decision["decision"] == "rolled_back" and decision["to_weight"] == 0
    assert any(reason.startswith("max_confidence_psi") for reason in decision["reasons"])
    assert judge.serving() == {"vision": {"mode": "off", "weight": 0.0}}


def test_errors_roll_back_before_the_window_is_full():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    (decision,) = judged(judge, clock, rollout, window(100), window(3, errors=2))
    assert decision["decision"] == "rolled_back"
    assert decision["reasons"][0].startswith("max_error_rate: 0.4")


def test_a_slower_candidate_is_rolled_back():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    (decision,) = judged(judge, clock, rollout, window(100, seconds=0.02), window(20, seconds=0.2))
    assert decision["decision"] == "rolled_back" and "max_p95_latency_ratio" in decision["reasons"][0]


def test_shadow_mode_is_judged_on_agreement():
    clock = Clock()
    judge = Judge(clock)
    rollout = Rollout(candidate="c", mode="shadow", policy={"min_requests": 20, "interval_s": 1})
    judge.configure("vision", rollout, configured_at=1.0)
    (decision,) = judged(judge, clock, rollout, window(30), window(20, agree=20))
    assert decision["decision"] == "passed" and judge.serving()["vision"]["mode"] == "shadow"

    other = Rollout(candidate="c2", mode="shadow", policy={"min_requests": 20, "interval_s": 1})
    judge.configure("vision", other, configured_at=2.0)
    disagreeing = Window(**window(20))
    for index in range(20):
        disagreeing.compare(index < 10, 0.5)
    (decision,) = judged(judge, clock, other, window(30), disagreeing.as_dict())
    assert decision["decision"] == "failed" and "min_agreement: 0.5" in decision["reasons"][-2]
    assert judge.serving()["vision"]["mode"] == "off"


def test_the_newest_configuration_wins_and_counts_made_under_another_are_dropped():
    clock = Clock()
    judge, old, new = Judge(clock), canary(), canary(steps=[20, 100])
    judge.configure("vision", new, configured_at=2.0)
    judge.configure("vision", old, configured_at=1.0)  # a replica that has not been updated yet
    assert judge.rollouts["vision"].config == new
    judge.record("vision", old, {"candidate": window(500)}, ready=True)
    assert judge.rollouts["vision"].candidate.requests == 0
    judge.forget(set(), configured_at=3.0)  # the rollout was removed from the YAML
    assert judge.rollouts == {}


def test_an_operator_pauses_resumes_promotes_and_aborts():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    assert judge.act("vision", "pause", "key ops")["status"] == "paused"
    assert judged(judge, clock, rollout, window(50), window(50)) == []  # paused: not judged
    assert judge.serving()["vision"] == {"mode": "canary", "weight": 10}
    assert judge.act("vision", "resume")["status"] == "canary"
    assert judge.act("vision", "promote")["to_weight"] == 50
    assert judge.act("vision", "abort")["to_weight"] == 0
    with pytest.raises(ValueError, match="nothing to abort"):
        judge.act("vision", "abort")
    with pytest.raises(KeyError):
        judge.act("text", "pause")
    assert [d["decision"] for d in judge.describe()["vision"]["decisions"]] == [
        "paused", "resumed", "step", "aborted"
    ]  # fmt: skip


def test_statistics():
    assert psi([500, 0, 0], [20, 0, 0]) == 0  # one kind of input on both sides: no drift, whatever the counts
    assert psi([500, 0, 0], [0, 0, 20]) > 3
    assert rank_correlation(np.array([0.1, 0.2, 0.7]), np.array([0.2, 0.3, 0.5])) == pytest.approx(1.0)
    assert rank_correlation(np.array([0.1, 0.2, 0.7]), np.array([0.7, 0.2, 0.1])) == pytest.approx(-1.0)
    counts = Window(**window(100, seconds=0.02))
    assert 0.02 <= counts.latency_quantile(0.95) < 0.025


# --- routing a request -------------------------------------------------------------------------------------


@dataclass
class Answer:
    labels: list
    probs: np.ndarray
    variant: str = "stable"


@dataclass
class Variant:
    """A variant's grouped calls: answers, or fails, and remembers what it was sent."""

    top: str
    fails: bool = False
    delay_s: float = 0.0
    seen: list = field(default_factory=list)

    def sender(self):
        async def send(calls):
            self.seen.extend(calls)
            await asyncio.sleep(self.delay_s)
            if self.fails:
                return [RuntimeError("the candidate broke") for _ in calls]
            return [Answer([(self.top, 0.9)], np.array([0.9, 0.1])) for _ in calls]

        return send


def rolled_out(rollout: Rollout, model: str = "vision") -> Rollouts:
    rollouts = Rollouts()
    rollouts.configs = {model: rollout}
    rollouts.serving = {model: {"mode": rollout.mode, "weight": rollout.weight}}
    rollouts.ready = {model: True}
    rollouts.windows = {model: {"stable": Window(), "candidate": Window()}}
    return rollouts


def routed(rollout: Rollout, stable: Variant, candidate: Variant) -> tuple[Rollouts, Routed]:
    rollouts = rolled_out(rollout)
    variants = {"stable": stable, "candidate": candidate}
    return rollouts, Routed("vision", rollouts, lambda variant: variants[variant].sender())


async def request(route: Routed, item, caller: str | None = None, pin: str | None = None):
    used = usage.begin()
    used.caller, used.pin = caller, pin
    return await route(item), used.variants


def test_a_canary_request_goes_to_the_callers_variant_and_a_failed_one_is_answered_by_the_stable_variant():
    async def run():
        stable, candidate = Variant("cat"), Variant("dog", fails=True)
        rollouts, route = routed(Rollout(candidate="c", mode="canary", weight=100), stable, candidate)
        answer, variants = await request(route, ("pixels",), caller="someone")
        assert answer.labels[0][0] == "cat" and variants == {"vision": "stable"}
        assert candidate.seen == [("pixels",)] and rollouts.windows["vision"]["candidate"].errors == 1
        pinned = pytest.raises(RuntimeError, match="broke")
        with pinned:  # a pinned request gets the candidate's own answer, even an error
            await request(route, ("pixels",), pin="candidate")

    asyncio.run(run())


def test_shadow_copies_never_change_the_answer_and_are_dropped_beyond_their_budget():
    async def run():
        stable, candidate = Variant("cat"), Variant("dog", delay_s=0.05)
        rollouts, route = routed(Rollout(candidate="c", mode="shadow", shadow_in_flight=2), stable, candidate)
        answers = await asyncio.gather(*(request(route, (i,)) for i in range(5)))
        assert all(answer.labels[0][0] == "cat" and variants == {"vision": "stable"} for answer, variants in answers)
        await asyncio.sleep(0.2)
        counts = rollouts.windows["vision"]["candidate"]
        assert (counts.compared, counts.agreed, counts.dropped) == (2, 0, 3)
        assert len(candidate.seen) == 2

        masked = usage.begin()
        masked.masker = object()  # this request's texts are masked: it is used for its own answer only
        await route(("private",))
        await asyncio.sleep(0.1)
        assert ("private",) not in candidate.seen

    asyncio.run(run())


def embeddings(*vectors) -> TextEmbeddings:
    vectors = np.array(vectors, dtype=np.float32)
    return TextEmbeddings(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), "m", "1")


def test_each_model_kind_compares_what_it_answers():
    same = embeddings([1, 0, 0], [0, 1, 0])
    assert compare(same, embeddings([1, 0.01, 0], [0, 1, 0])) == (True, pytest.approx(1.0, abs=1e-3))
    agree, cosine = compare(same, embeddings([1, 0.5, 0], [0, 1, 0]))  # one text's vector turned by 27 degrees
    assert not agree and cosine == pytest.approx((0.894 + 1) / 2, abs=1e-3)
    ranking = TextRanking([("sports", 0.6), ("finance", 0.3), ("cooking", 0.1)], "m", "1")
    reordered = TextRanking([("sports", 0.5), ("cooking", 0.3), ("finance", 0.2)], "m", "1")
    assert compare(ranking, ranking) == (True, 1.0)
    assert compare(ranking, reordered) == (True, pytest.approx(0.5))  # same top label, the others swapped
    assert compare(TextScores([0.2, 0.9], "m", "1"), TextScores([0.9, 0.2], "m", "1")) == (False, pytest.approx(-1.0))
    assert compare("Blue.", "Blue.") == (True, None) and compare("Blue.", "Red.") == (False, None)
    page = read("OPEN", "9 to 5")
    assert compare(page, read("OPEN", "9 to 5")) == (True, 1.0)
    assert compare(page, read("OPEN", "9 t0 5", "Sundays")) == (False, pytest.approx(1 / 3))
    assert confidence(page) == pytest.approx(0.8) and confidence(read()) is None
    assert confidence(ranking) == 0.6 and confidence("Blue.") is None


def read(*lines: str) -> OcrResult:
    return OcrResult([OcrLine(text, 0.8, []) for text in lines], False, "m", "1", 0.1)


@dataclass
class Encoder:
    """A text variant's handle-like sender: embeds each text as a fixed vector."""

    vector: list
    seen: list = field(default_factory=list)

    def sender(self):
        async def send(call):
            method, (texts,) = call
            self.seen.append(texts)
            return embeddings(*[self.vector] * len(texts))

        return send


def test_text_calls_go_to_the_picked_variant_one_by_one_and_shadow_copies_compare_embeddings():
    async def run():
        stable, candidate = Encoder([1, 0]), Encoder([0.6, 0.8])
        rollouts = rolled_out(Rollout(candidate="c", mode="shadow"), "text")
        variants = {"stable": stable, "candidate": candidate}
        route = Routed("text", rollouts, lambda variant: variants[variant].sender(), grouped=False)
        used = usage.begin()
        answer = await route(("embed", (["a", "b"],)))
        assert np.allclose(answer.vectors, [[1, 0], [1, 0]]) and used.variants == {"text": "stable"}
        await asyncio.sleep(0.05)
        counts = rollouts.windows["text"]["candidate"]
        assert candidate.seen == [["a", "b"]] and (counts.compared, counts.agreed) == (1, 0)
        assert counts.similarity == pytest.approx(0.6)

        rollouts.serving["text"] = {"mode": "canary", "weight": 100}
        answer = await route(("embed", (["c"],)))
        assert np.allclose(answer.vectors, [[0.6, 0.8]]) and rollouts.windows["text"]["candidate"].requests == 2

    asyncio.run(run())


@dataclass
class Chunk:
    text: str


class Stream:
    """A streamed answer: its chunks, or a failure after the first."""

    def __init__(self, texts: list[str], fails_after: int | None = None):
        self.texts, self.fails_after, self.closed = texts, fails_after, False

    async def chunks(self):
        try:
            for index, text in enumerate(self.texts):
                if index == self.fails_after:
                    raise RuntimeError("the replica died")
                yield Chunk(text)
        finally:
            self.closed = True


def test_a_streamed_answer_counts_when_it_ends_and_a_greedy_one_is_compared_in_shadow_mode():
    async def run():
        rollouts = rolled_out(Rollout(candidate="c", mode="shadow"), "llm")
        usage.begin()
        call = await rollouts.routed("llm", lambda variant: asyncio.sleep(0, variant))
        assert call.variant == "stable" and not call.fell_back

        async def candidate_text():
            return "Blue!"

        stream = Stream(["Bl", "ue."])
        texts = [chunk.text async for chunk in rollouts.followed("llm", call, 0.0, stream.chunks(), candidate_text)]
        assert texts == ["Bl", "ue."] and stream.closed
        await asyncio.sleep(0.05)
        stable, candidate = rollouts.windows["llm"]["stable"], rollouts.windows["llm"]["candidate"]
        assert stable.requests == 1 and (candidate.compared, candidate.agreed, candidate.similarity) == (1, 0, None)

        broken = Stream(["Bl", "ue."], fails_after=1)
        with pytest.raises(RuntimeError):
            async for _ in rollouts.followed("llm", call, 0.0, broken.chunks(), candidate_text):
                pass
        assert stable.errors == 1 and broken.closed

        left = Stream(["Bl", "ue."])  # the caller hangs up after the first chunk: counted neither way
        followed = rollouts.followed("llm", call, 0.0, left.chunks(), candidate_text)
        await anext(followed)
        await followed.aclose()
        assert stable.requests == 2 and left.closed

    asyncio.run(run())


# --- the operator's routes ---------------------------------------------------------------------------------


class FakeJudge:
    """The judge's deployment handle, answering as ``deployments.judge.RolloutJudge`` does."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.describe = self.method(lambda: judge.describe())
        self.act = self.method(self._act)

    def _act(self, model, action, who):
        try:
            return {"decision": {"model": model, **self.judge.act(model, action, who)}}
        except KeyError:
            return {"refused": "not_found", "message": f"the model {model!r} has no rollout"}
        except ValueError as exc:
            return {"refused": "conflict", "message": str(exc)}

    @staticmethod
    def method(function):
        class Method:
            @staticmethod
            async def remote(*args):
                return function(*args)

        return Method


def test_the_admin_routes_need_the_admin_scope_and_act_on_the_judge():
    from api.access import Guard
    from tests.unit.fake_dataplane import FakeDataplane, client

    clock = Clock()
    judge = Judge(clock)
    judge.configure("vision", canary(), configured_at=1.0)
    dataplane = FakeDataplane()
    dataplane.rollouts = Rollouts(FakeJudge(judge))
    dataplane.rollouts.configs = {"vision": canary()}
    guard = Guard()
    guard.configure(True, [ApiKey(id="ops", sha256=digest("maas_ops"), routes=["admin"]),
                           ApiKey(id="team", sha256=digest("maas_team"), routes=["v1"])], None)  # fmt: skip
    api = client(dataplane, guard=guard)
    ops, team = {"Authorization": "Bearer maas_ops"}, {"Authorization": "Bearer maas_team"}

    assert api.get("/v1/admin/rollouts", headers=team).status_code == 403
    listed = api.get("/v1/admin/rollouts", headers=ops)
    assert listed.status_code == 200 and listed.json()["rollouts"]["vision"]["weight"] == 10
    paused = api.post("/v1/admin/rollouts", json={"model": "vision", "action": "pause"}, headers=ops)
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert paused.json()["reasons"] == ["pause by key ops"]
    again = api.post("/v1/admin/rollouts", json={"model": "vision", "action": "pause"}, headers=ops)
    assert again.status_code == 409 and "paused" in again.text
    unknown = api.post("/v1/admin/rollouts", json={"model": "vision", "action": "delete"}, headers=ops)
    assert unknown.status_code == 422
    judge.rollouts.clear()
    gone = api.post("/v1/admin/rollouts", json={"model": "vision", "action": "abort"}, headers=ops)
    assert gone.status_code == 404 and "no rollout" in gone.text


def test_a_new_candidate_version_starts_the_rollout_again():
    clock = Clock()
    judge, rollout = Judge(clock), canary()
    judge.configure("vision", rollout, configured_at=1.0)
    judge.record("vision", rollout, {}, ready=True, version="v2")
    for _ in range(3):
        judged(judge, clock, rollout, window(50), window(20))
    assert judge.rollouts["vision"].status == "promoted"
    judge.record("vision", rollout, {"candidate": window(5)}, ready=True, version="v3")  # redeployed candidate
    state = judge.rollouts["vision"]
    assert (state.status, state.weight, state.candidate.requests) == ("canary", 10, 0)
    assert judge.describe()["vision"]["candidate_version"] == "v3"
    judge.record("vision", rollout, {}, ready=True, version="v2")  # a replica still on the old one: no restart
    assert judge.rollouts["vision"] is state


def test_a_wrong_method_names_every_method_of_the_path():
    from tests.unit.fake_dataplane import client

    refused = client().put("/v1/admin/rollouts")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST"
