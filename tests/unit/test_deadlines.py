"""How long a request waited before the ingress saw it, from the proxy's ``x-maas-received-at``."""

import time

import pytest

from api.middleware import waited_at_proxy


def scope(received_at: str | None) -> dict:
    headers = [(b"content-type", b"application/json")]
    return {"headers": headers if received_at is None else [*headers, (b"x-maas-received-at", received_at.encode())]}


def test_the_time_since_the_proxy_received_the_request_counts():
    assert waited_at_proxy(scope(f"{time.time() - 2:.6f}"), timeout_s=30) == pytest.approx(2, abs=0.5)


def test_without_the_proxys_stamp_nothing_has_waited():
    assert waited_at_proxy(scope(None), timeout_s=30) == 0


@pytest.mark.parametrize("received_at", ["soon", "", "nan", "inf", "-inf"])
def test_a_malformed_stamp_counts_as_no_wait(received_at):
    assert waited_at_proxy(scope(received_at), timeout_s=30) == 0


def test_clock_skew_neither_stretches_nor_overshoots_the_timeout():
    assert waited_at_proxy(scope(f"{time.time() + 5:.6f}"), timeout_s=30) == 0  # a proxy clock ahead of ours
    assert waited_at_proxy(scope("0"), timeout_s=30) == 30
