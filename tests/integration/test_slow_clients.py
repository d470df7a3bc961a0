"""Slow and untrusted clients through Serve's real HTTP proxy, with the project's hardening loaded.

A request head must arrive within MAAS_HTTP_HEADER_TIMEOUT_S (10 s by default)
and a whole request within http_options.request_timeout_s (30 s), or a client's
shorter x-request-timeout-seconds; a client may not lengthen that or send a
request id of any length. The three slow clients run side by side.
"""

import socket
import threading
import time
from urllib.parse import urlparse

HEADER_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 30


def connect(app_url: str) -> socket.socket:
    url = urlparse(app_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    return sock


def read_response(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except OSError:
        return b""


def slow_head(app_url: str, outcome: dict) -> None:
    """Headers at one byte a second, as in a slowloris attack."""
    sock, start = connect(app_url), time.monotonic()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nhost: maas\r\nuser-agent: slow\r\n\r\n":
            sock.send(bytes([byte]))
            time.sleep(1)
    except OSError:
        pass  # cut off
    outcome.update(response=read_response(sock), seconds=time.monotonic() - start)


def silent(app_url: str, outcome: dict) -> None:
    sock, start = connect(app_url), time.monotonic()
    outcome.update(response=read_response(sock), seconds=time.monotonic() - start)


def stalled_body(app_url: str, outcome: dict, timeout_header: bytes) -> None:
    """A head at once, then part of the body and nothing more."""
    sock, start = connect(app_url), time.monotonic()
    sock.sendall(
        b"POST /v1/text/embed HTTP/1.1\r\nhost: maas\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\nx-request-timeout-seconds: " + timeout_header + b"\r\n\r\n" + b'{"texts": ["a'
    )
    outcome.update(response=read_response(sock), seconds=time.monotonic() - start)


def slow_body(app_url: str, outcome: dict) -> None:
    stalled_body(app_url, outcome, b"2")  # a client may ask for less time


def slow_body_without_timeout(app_url: str, outcome: dict) -> None:
    stalled_body(app_url, outcome, b"0")  # Serve would take 0 as "no timeout"; the proxy hardening drops it


def test_slow_and_silent_clients_are_cut_off_in_bounded_time(app_url, client):
    outcomes = {name: {} for name in ("slow_head", "silent", "slow_body", "slow_body_without_timeout")}
    threads = [threading.Thread(target=globals()[name], args=(app_url, outcomes[name])) for name in outcomes]
    for thread in threads:
        thread.start()
    during = client.get("/healthz")  # others are served meanwhile
    for thread in threads:
        thread.join()

    assert during.status_code == 200
    for name in ("slow_head", "silent"):
        assert outcomes[name]["response"].startswith(b"HTTP/1.1 408"), (name, outcomes[name])
        assert HEADER_TIMEOUT_S - 1 < outcomes[name]["seconds"] < HEADER_TIMEOUT_S + 10, (name, outcomes[name])
    for name, (low, high) in {"slow_body": (1, 15), "slow_body_without_timeout": (REQUEST_TIMEOUT_S - 1, 50)}.items():
        assert outcomes[name]["response"].startswith(b"HTTP/1.1 408"), (name, outcomes[name])
        assert low < outcomes[name]["seconds"] < high, (name, outcomes[name])


def test_request_ids_are_echoed_only_when_short_and_plain(client):
    assert client.get("/healthz", headers={"x-request-id": "order-42.retry:1"}).headers["x-request-id"] == (
        "order-42.retry:1"
    )
    for hostile in ("x" * 5000, "id with spaces", "<script>"):
        echoed = client.get("/healthz", headers={"x-request-id": hostile}).headers["x-request-id"]
        assert echoed != hostile and len(echoed) <= 64


def test_the_ingress_states_its_own_time_for_clients_to_compare(client):
    timing = client.get("/healthz").headers["server-timing"]
    assert timing.startswith("ingress;dur=") and float(timing.split("=")[1]) < 1000
