"""Fixtures of the router tests: a fake dataplane, and the real app over it (``fake_dataplane``)."""

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
