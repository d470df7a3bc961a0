"""What a user of ``make serve`` (behind HAProxy, its default ingress) would notice: the same answers and errors
as through Serve's proxy, over HTTPS only, a slow client cut off, nothing of HAProxy's open beyond loopback, and
nothing left running once the server is stopped. The tests run in file order; the last one stops the server."""

import socket
import time

import httpx
import openai
import psutil
import pytest

from tests.conftest import b64
from tests.haproxy.conftest import HEADER_TIMEOUT_S, HTTP_PORT, haproxy_processes

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat", "Persian cat", "Siamese cat", "lynx"}


def _listeners(pid: int) -> list:
    return [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


def test_haproxy_holds_the_http_port(server):
    processes = haproxy_processes(server.sid)
    assert processes, f"no HAProxy on the launcher's configuration:\n{server.tail()}"
    ports = {c.laddr.port for p in processes for c in _listeners(p.pid)}
    assert HTTP_PORT in ports


def test_the_port_speaks_https_with_the_given_certificate_only(server):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/healthz", timeout=10)  # a client that does not trust the certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{HTTP_PORT}/healthz", timeout=10).raise_for_status()  # plain HTTP
    assert httpx.get(f"{server.url}/healthz", verify=server.tls, timeout=10).status_code == 200


def test_a_cat_photo_is_classified_through_haproxy(client, chelsea_jpeg):
    response = client.post("/v1/vision/classify", json={"image": b64(chelsea_jpeg), "top_k": 3})
    assert response.status_code == 200, response.text
    assert response.json()["labels"][0]["label"] in CAT_CLASSES
    # The ingress replica served it itself: its own timing header, no proxy hop in it.
    assert "ingress;dur=" in response.headers["server-timing"]


def test_a_bad_image_gets_the_ingress_422_with_what_was_wrong(client):
    response = client.post("/v1/vision/classify", json={"image": "not base64!"})
    assert response.status_code == 422
    assert "image is not valid base64" in response.text
    assert "not base64!" not in response.text  # the payload is not echoed


def test_a_40_kib_request_head_reaches_the_app_and_one_over_64_kib_is_refused(client, chelsea_jpeg):
    """Heads as large as Serve's proxy takes (a long bearer token, many cookies): HAProxy's buffers and the
    ingress replica's own server both let them through."""
    payload = {"image": b64(chelsea_jpeg), "top_k": 1}
    response = client.post("/v1/vision/classify", json=payload, headers={"X-Padding": "x" * 40 * 1024})
    assert response.status_code == 200, response.text
    assert response.json()["labels"][0]["label"] in CAT_CLASSES
    assert client.get("/healthz", headers={"X-Padding": "x" * 70 * 1024}).status_code == 400


def test_an_answer_streams_through_haproxy(server):
    llm = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
        http_client=httpx.Client(verify=server.tls, timeout=120),
    )  # fmt: skip
    chunks = list(
        llm.chat.completions.create(
            model="llm", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text.strip()


def test_a_request_head_sent_too_slowly_gets_408_and_is_closed(server):
    plain = socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=60)
    with server.tls.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/vision/classify HTTP/1.1\r\nHost: maas\r\n")  # and never the rest
        answer = sock.recv(4096)
        waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert sock.recv(4096) == b""  # closed
    assert waited >= HEADER_TIMEOUT_S - 0.5  # cut off by the deadline, not refused at once


def test_haproxys_own_listeners_are_on_loopback_only(server):
    listeners = [c for p in haproxy_processes(server.sid) for c in _listeners(p.pid)]
    assert len(listeners) >= 3  # the HTTP frontend, the statistics page, the Prometheus exporter
    assert {c.laddr.ip for c in listeners} == {"127.0.0.1"}


def _holders(port: int) -> list[str]:
    """The processes listening on ``port``, by pid and command line."""
    holders = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(c.laddr.port == port for c in _listeners(process.pid)):
                holders.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:200]}")
        except psutil.Error:
            continue
    return holders


def test_stopping_the_server_leaves_no_haproxy_running(server):
    assert haproxy_processes(server.sid)
    server.stop()
    # Every HAProxy of the server's session goes, those a reload started after this test began included (a
    # snapshot taken before the stop would miss them), and the launchers still starting one.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and haproxy_processes(server.sid, launchers=True):
        time.sleep(0.2)
    left = [f"{p.pid}: {' '.join(p.cmdline())[:200]}" for p in haproxy_processes(server.sid, launchers=True)]
    assert not left, f"HAProxy outlived the server: {left}"
    assert not _holders(HTTP_PORT), f"port {HTTP_PORT} still held: {_holders(HTTP_PORT)}"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", HTTP_PORT))  # the port is free again
