"""Fixtures of the router tests: a fake dataplane, and the real app over it (``fake_dataplane``)."""

import pytest

from tests.unit.fake_dataplane import FakeDataplane, client


@pytest.fixture
def dataplane():
    return FakeDataplane()


@pytest.fixture
def api(dataplane):
    return client(dataplane)
