"""Fusion's class-name embeddings during live updates, and its replica's settings, with fake model handles
(no Ray)."""

import asyncio
import hashlib
from dataclasses import dataclass
from unittest.mock import Mock

import numpy as np
import pytest

from deployments.contracts import TextEmbeddings
from deployments.errors import InvalidInput, ModelUnavailable
from deployments.fusion import (
    CLASS_EMBEDDING_CHUNK,
    METHOD,
    NAME,
    ClassEmbeddings,
    FusionConfig,
    FusionScorer,
    KeptMatrices,
)


@dataclass
class Call:
    """What ``handle.method.remote(...)`` returns: an awaitable."""

    value: object

    def __await__(self):
        yield from asyncio.sleep(0.01).__await__()
        return self.value


class FakeVision:
    def __init__(self, names: list[str], version: str):
        self.names, self.version = names, version
        self.class_names = self  # handle.class_names.remote()

    def remote(self):
        return Call((self.names, self.version))


class FakeText:
    def __init__(self, version: str, identity: str | None = None):
        self.version, self.calls = version, 0
        self.embed = self  # handle.embed.remote(texts, monitor=False)
        # handle.identity.remote(): None is a model on PyTorch, whose matrices are not kept
        self.identity = Mock(remote=lambda: Call((self.version, identity)))

    def remote(self, texts, monitor=True):
        self.calls += 1
        # The same vector for the same (version, text) in every run: hash() of a str differs between processes,
        # and two versions whose vectors happened to collide made a test fail about once in 10,000 runs.
        vectors = np.array(
            [list(hashlib.sha256(f"{self.version}|{t}".encode()).digest()[:8]) for t in texts], np.float32
        )
        return Call(TextEmbeddings(vectors=vectors, model="text", version=self.version))


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_new_vision_version_with_the_same_classes_reuses_the_matrix():
    vision, text = FakeVision(["cat", "dog"], "v1"), FakeText("t1")
    cache = ClassEmbeddings(vision, text)

    async def scenario():
        first = await cache.get("v1", "t1", "{}")
        vision.version = "v2"  # new weights, same classes
        second = await cache.get("v2", "t1", "{}")
        return first, second

    first, second = run(scenario())
    assert text.calls == 1 and first is second


def test_a_new_text_version_or_prompt_gets_its_own_matrix_and_concurrent_requests_share_one():
    vision, text = FakeVision(["cat", "dog"], "v1"), FakeText("t1")
    cache = ClassEmbeddings(vision, text)

    async def scenario():
        together = await asyncio.gather(*(cache.get("v1", "t1", "{}") for _ in range(5)))
        text.version = "t2"
        newer = await cache.get("v1", "t2", "{}")
        prompted = await cache.get("v1", "t2", "a photo of a {}")
        return together, newer, prompted

    together, newer, prompted = run(scenario())
    assert text.calls == 3  # one per (classes, text version, prompt), not one per request
    assert all(m is together[0] for m in together)
    assert not np.array_equal(together[0], newer) and not np.array_equal(newer, prompted)


def test_many_class_names_are_embedded_a_chunk_per_call_in_order_and_by_one_text_version():
    """A call of 1000 names would queue every live text request behind all of them."""
    names = [f"class {i}" for i in range(2 * CLASS_EMBEDDING_CHUNK + 3)]
    vision, text = FakeVision(names, "v1"), FakeText("t1")
    answered_by = iter(["t1", "t0", "t1", "t1"])  # the second call meets a replica of the outgoing version

    def remote(texts, monitor=True):
        assert len(texts) <= CLASS_EMBEDDING_CHUNK and monitor is False
        text.version = next(answered_by)
        return FakeText.remote(text, texts, monitor)

    text.embed = Mock(remote=remote)
    matrix = run(ClassEmbeddings(vision, text).get("v1", "t1", "{}"))
    assert text.calls == 4  # three chunks, one asked twice
    whole = FakeText("t1").remote(names).value.vectors
    np.testing.assert_array_equal(matrix, whole)


def test_a_version_no_longer_served_is_a_retryable_unavailability():
    vision, text = FakeVision(["cat"], "v2"), FakeText("t1")
    cache = ClassEmbeddings(vision, text)
    with pytest.raises(ModelUnavailable) as info:
        run(cache.get("v1", "t1", "{}"))  # every vision replica already runs v2
    assert info.value.retryable


def test_a_starting_replica_reads_the_matrix_an_earlier_one_kept_for_the_same_model(tmp_path):
    names = ["cat", "dog", "sofa"]
    first_text = FakeText("t1", identity="graph-a/onnxruntime 1")
    run(ClassEmbeddings(FakeVision(names, "v1"), first_text, KeptMatrices(tmp_path)).warm("{}"))
    assert first_text.calls == 1 and len(list(tmp_path.glob("*.npy"))) == 1

    restarted = FakeText("t1", identity="graph-a/onnxruntime 1")
    cache = ClassEmbeddings(FakeVision(names, "v1"), restarted, KeptMatrices(tmp_path))
    run(cache.warm("{}"))
    matrix = run(cache.get("v1", "t1", "{}"))
    assert restarted.calls == 0  # not one class name sent to the text model
    np.testing.assert_array_equal(matrix, FakeText("t1").remote(names).value.vectors)


@pytest.mark.parametrize(
    "change",
    [
        {"identity": "graph-b/onnxruntime 1"},  # another text model under the same version string
        {"identity": "graph-a/onnxruntime 2"},  # the same graph on another runtime
        {"prompt": "a photo of a {}"},
        {"names": ["cat", "dog", "chair"]},
        {"identity": None},  # a model on PyTorch: nothing kept, nothing read
    ],
)
def test_a_matrix_is_read_only_for_the_same_names_prompt_and_text_model(tmp_path, change):
    names = ["cat", "dog", "sofa"]
    run(ClassEmbeddings(FakeVision(names, "v1"), FakeText("t1", "graph-a/onnxruntime 1"), KeptMatrices(tmp_path))
        .warm("{}"))  # fmt: skip
    text = FakeText("t1", change.get("identity", "graph-a/onnxruntime 1"))
    vision = FakeVision(change.get("names", names), "v1")
    run(ClassEmbeddings(vision, text, KeptMatrices(tmp_path)).warm(change.get("prompt", "{}")))
    assert text.calls == 1


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "not finite", "a pickle"])
def test_a_damaged_kept_matrix_is_made_again_and_replaced(tmp_path, damage):
    names = ["cat", "dog", "sofa"]
    kept = KeptMatrices(tmp_path)
    path = kept.path(names, "graph-a/onnxruntime 1", "{}")
    path.parent.mkdir(parents=True, exist_ok=True)
    good = FakeText("t1").remote([n for n in names]).value.vectors
    if damage == "truncated":
        kept.keep(names, "graph-a/onnxruntime 1", "{}", good)
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "wrong shape":
        np.save(path, good[:2])
    elif damage == "not finite":
        np.save(path, np.where(good > 100, np.nan, good).astype(np.float32))
    else:
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    text = FakeText("t1", "graph-a/onnxruntime 1")
    cache = ClassEmbeddings(FakeVision(names, "v1"), text, kept)
    run(cache.warm("{}"))
    assert text.calls == 1
    np.testing.assert_array_equal(run(cache.get("v1", "t1", "{}")), good)
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), good)  # replaced by the one just made


def test_an_unwritable_model_cache_costs_only_the_time_to_make_the_matrix(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    text = FakeText("t1", "graph-a/onnxruntime 1")
    cache = ClassEmbeddings(FakeVision(["cat", "dog"], "v1"), text, KeptMatrices(blocked / "conse"))
    run(cache.warm("{}"))
    assert text.calls == 1 and run(cache.get("v1", "t1", "{}")).shape == (2, 8)


def test_a_matrix_made_for_a_new_text_version_is_kept_under_that_model(tmp_path):
    vision, text = FakeVision(["cat", "dog"], "v1"), FakeText("t2", "graph-b/onnxruntime 1")
    run(ClassEmbeddings(vision, text, KeptMatrices(tmp_path)).get("v1", "t2", "{}"))
    assert KeptMatrices(tmp_path).read(["cat", "dog"], "graph-b/onnxruntime 1", "{}") is not None


def test_the_fusion_replica_reports_its_settings_and_keeps_them_on_a_bad_update():
    scorer = FusionScorer.func_or_class(FakeVision(["cat", "dog"], "v1"), FakeText("t1"))
    run(scorer.reconfigure({"top_t": 5}))
    assert run(scorer.ready()) == {"model": NAME, "version": "conse-top5"}
    details = run(scorer.info())["details"]
    assert details == {"method": METHOD, **FusionConfig(top_t=5).model_dump(), "update_error": None}
    run(scorer.reconfigure({"top_t": 7, "class_prompt": "no slot"}))
    assert run(scorer.ready())["version"] == "conse-top5"
    assert "class_prompt must contain exactly one '{}'" in run(scorer.info())["details"]["update_error"]


def test_fusion_counts_a_refused_call_by_its_error_type():
    scorer = FusionScorer.func_or_class(FakeVision(["cat"], "v1"), FakeText("t1"))
    run(scorer.reconfigure({}))
    scorer.metrics = Mock()
    embeddings = TextEmbeddings(vectors=np.ones((3, 2), np.float32), model="text", version="t1")
    with pytest.raises(InvalidInput, match="sum to 0"):
        run(scorer.fuse(None, embeddings, True, 0.0, 0.0))
    (error,), _ = scorer.metrics.observe_error.call_args
    assert isinstance(error, InvalidInput)
