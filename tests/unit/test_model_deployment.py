"""The shared shape of the model deployments (deployments.runtime.ModelDeployment), without Ray."""

import asyncio
from unittest.mock import Mock

import pytest
from pydantic import ValidationError
from ray import serve

from deployments import runtime
from deployments.fusion import FusionConfig, FusionScorer
from deployments.runtime import BatchingConfig, ModelDeployment
from deployments.text import TextEncoder, TextSettings
from deployments.vision import VisionClassifier, VisionSettings

# What GET /v1/models reports for each replica.
INFO_KEYS = set("name created task source version device resources torch_threads placement details drift".split())


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.mark.parametrize(
    ("deployment", "method", "settings"),
    [
        (VisionClassifier, "_classify_batch", VisionSettings),
        (TextEncoder, "_embed_batch", TextSettings),
        (FusionScorer, "_fuse_batch", FusionConfig),
    ],
)
def test_batch_decorators_take_the_settings_defaults(deployment, method, settings):
    batch = getattr(deployment.func_or_class, method)
    defaults = settings()
    assert batch._get_max_batch_size() == defaults.max_batch_size
    assert batch._get_batch_wait_timeout_s() == defaults.batch_wait_timeout_s
    assert settings.batch_defaults() == defaults.batching()


class FakeSettings(BatchingConfig):
    model: str = "fake"
    fail: bool = False


class FakeDeployment(ModelDeployment):
    """The least a model deployment implements: what it serves, how it is described, how settings load."""

    settings_type = FakeSettings
    task = "fake-task"

    def __init__(self, start_after=None):
        super().__init__(start_after)
        self.model: str | None = None
        self.metrics = Mock()

    async def prepare(self, settings: FakeSettings) -> str:
        if settings.fail:
            raise RuntimeError("cannot load")
        return settings.model

    def commit(self, model: str) -> None:
        self.model = model
        self.metrics.set_model(*self.served())

    def batch_methods(self) -> list:
        return [self._batch]

    def served(self) -> tuple[str, str]:
        return self.model, "v1"

    def describe(self) -> dict:
        return {"source": "nowhere", "device": "cpu", "torch_threads": 0, "details": {"size": 1}, "drift": None}

    @serve.batch(**FakeSettings.batch_defaults())
    async def _batch(self, items: list) -> list:
        return items


def test_the_first_settings_must_be_valid_and_load():
    with pytest.raises(ValidationError, match="max_batch_size"):
        run(FakeDeployment().reconfigure({"max_batch_size": 0}))
    with pytest.raises(RuntimeError, match="cannot load"):
        run(FakeDeployment().reconfigure({"fail": True}))


def test_settings_are_applied_and_reported():
    deployment = FakeDeployment()
    run(deployment.reconfigure({"model": "a", "max_batch_size": 3, "batch_wait_timeout_s": 0.01}))
    assert deployment._batch._get_max_batch_size() == 3
    assert deployment._batch._get_batch_wait_timeout_s() == 0.01
    assert run(deployment.ready()) == {"model": "a", "version": "v1"}
    info = run(deployment.info())
    assert set(info) == INFO_KEYS
    assert (info["name"], info["task"], info["version"]) == ("a", "fake-task", "v1")
    assert info["details"] == {"size": 1, "update_error": None}
    deployment.metrics.set_model.assert_called_with("a", "v1")


@pytest.mark.parametrize(
    ("update", "error"),
    [({"model": "b", "max_batch_size": 0}, "ValidationError"), ({"model": "b", "fail": True}, "RuntimeError")],
)
def test_a_bad_update_keeps_the_current_settings_and_says_why(update, error):
    deployment = FakeDeployment()
    run(deployment.reconfigure({"model": "a", "max_batch_size": 3}))
    current = deployment.settings
    run(deployment.reconfigure(update))
    assert deployment.settings is current and deployment.model == "a"
    assert deployment._batch._get_max_batch_size() == 3
    assert deployment.update_error.startswith(f"{error}: ")
    assert run(deployment.info())["details"]["update_error"] == deployment.update_error
    (failure,), _ = deployment.metrics.observe_update_failure.call_args
    assert type(failure).__name__ == error
    run(deployment.reconfigure({"model": "b"}))  # a good update clears the error
    assert deployment.model == "b" and deployment.update_error is None


class FirstModels:
    """A handle to the deployment a replica starts after: ``ready`` answers once ``serving`` is set, or raises."""

    deployment_name = "FusionScorer"

    def __init__(self, error: Exception | None = None):
        self.serving = asyncio.Event()
        self.error, self.asked = error, 0
        self.ready = self  # handle.ready.remote()

    async def remote(self):
        self.asked += 1
        if self.error is not None:
            raise self.error
        await self.serving.wait()
        return {"model": "conse-late-fusion", "version": "conse-top10"}


def test_a_replica_loads_its_first_model_only_once_the_deployment_it_starts_after_serves():
    async def scenario():
        first = FirstModels()
        deployment = FakeDeployment(start_after=first)
        starting = asyncio.ensure_future(deployment.reconfigure({"model": "a"}))
        await asyncio.sleep(0.2)
        loaded_before = deployment.model
        first.serving.set()
        await asyncio.wait_for(starting, 5)
        await deployment.reconfigure({"model": "b"})  # a live update never waits
        return loaded_before, deployment.model, first.asked

    assert run(scenario()) == (None, "b", 1)


def test_a_deployment_that_never_serves_delays_a_start_but_does_not_stop_it(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "START_AFTER_TIMEOUT_S", 0.3)
    deployment = FakeDeployment(start_after=FirstModels())
    run(asyncio.wait_for(deployment.reconfigure({"model": "a"}), 5))
    assert deployment.model == "a"
    assert "FusionScorer did not serve within 0.3 s; starting without waiting longer" in caplog.text


def test_a_failing_deployment_to_start_after_does_not_stop_a_start(caplog):
    deployment = FakeDeployment(start_after=FirstModels(error=RuntimeError("replica died")))
    run(deployment.reconfigure({"model": "a"}))
    assert deployment.model == "a"
    assert "starting without waiting for FusionScorer: RuntimeError: replica died" in caplog.text


def test_counted_counts_an_error_by_its_type_and_lets_it_go_on():
    deployment = FakeDeployment()
    with deployment.counted():
        pass
    deployment.metrics.observe_error.assert_not_called()
    error = ValueError("bad input")
    with pytest.raises(ValueError, match="bad input"), deployment.counted():
        raise error
    deployment.metrics.observe_error.assert_called_once_with(error)


@pytest.mark.parametrize(
    ("deployment", "details"),
    [
        (VisionClassifier, {"classes", "embedding_dim", "weights", "runtime", "batching", "update_error"}),
        (TextEncoder, {"dim", "max_tokens", "label_cache", "runtime", "batching", "update_error"}),
    ],
)
def test_a_model_deployment_serves_its_packaged_model_and_keeps_it_when_an_update_fails(deployment, details):
    replica = deployment.func_or_class()
    run(replica.reconfigure({}))
    ready = run(replica.ready())
    info = run(replica.info())
    assert set(info) == INFO_KEYS and set(info["details"]) == details
    assert (info["name"], info["version"]) == (ready["model"], ready["version"])
    assert info["details"]["batching"] == replica.settings_type.batch_defaults()
    assert info["details"]["runtime"].startswith("onnxruntime ")  # the shipped runtime on a CPU
    run(replica.reconfigure({"model": {"source": "package:no_such_model_package"}}))
    assert run(replica.ready()) == ready
    assert "package 'no_such_model_package' is not installed" in run(replica.info())["details"]["update_error"]
