"""Fixtures of the unit tests: a fake dataplane and the real app over it (``fake_dataplane``), an event loop, and
the language-model deployment without Ray."""

import asyncio

import pytest

from tests.unit.fake_dataplane import FakeDataplane, client


@pytest.fixture
def dataplane():
    return FakeDataplane()


@pytest.fixture
def api(dataplane):
    return client(dataplane)


@pytest.fixture(scope="module")
def loop():
    """An event loop for a module's async deployment code, driven without Ray."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def generator(loop, request):
    """The language-model deployment's class, configured with the requesting module's ``SETTINGS`` through
    ``reconfigure`` as Serve would; its batcher runs the real model on this process's CPU."""
    from deployments.language import TextGenerator

    deployment = TextGenerator.func_or_class()
    loop.run_until_complete(deployment.reconfigure(request.module.SETTINGS))
    yield deployment
    deployment._sampler.cancel()
    loop.run_until_complete(asyncio.gather(deployment._sampler, return_exceptions=True))
    deployment.batcher.close()
