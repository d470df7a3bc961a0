"""deployments.proxy on real uvicorn servers, spoken to over raw sockets (no Ray).

Each server runs in a background thread with its own event loop (uvloop, as in
Ray's proxy actor), once with each of uvicorn's HTTP/1.1 protocol classes. The
app is wrapped the way Serve's proxy wraps its own: Serve's
``_apply_middlewares`` with what ``hardening()`` returns.
"""

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
import uvloop
import yaml
from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return

from deployments import proxy

ROOT = Path(__file__).resolve().parents[2]

HEADER_TIMEOUT_S = 0.5
MAX_HEADER_BYTES = 8 * 1024  # below h11's own 16 KiB limit, so both protocols reach ours
KEEP_ALIVE_S = 5
SLOW_HANDLER_S = 1.5 * HEADER_TIMEOUT_S
BYTE_INTERVAL_S = 0.2  # bytes at 0.0, 0.2, 0.4, 0.6 s: none near the 0.5 s deadline
IO_TIMEOUT_S = 5.0
CUT_OFF_BOUNDS_S = (0.8 * HEADER_TIMEOUT_S, 5 * HEADER_TIMEOUT_S)

HTTP_PROTOCOLS = ["h11", "httptools"]
SEEN_HEADERS = (b"x-request-id", b"x-request-timeout-seconds", b"x-request-disconnect-disabled", b"x-maas-received-at")


async def echo_app(scope, receive, send):
    """Answers the ``SEEN_HEADERS`` it received, in order; /slow first sleeps."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": message["text"]})
        await send({"type": "websocket.close"})
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":  # answers without reading the body, as a 413 does
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    more_body = True
    while more_body:
        more_body = (await receive()).get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_HANDLER_S)
    seen = [[name.decode(), value.decode("latin-1")] for name, value in scope["headers"] if name in SEEN_HEADERS]
    body = json.dumps(seen).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class RunningServer:
    http: str
    port: int


@contextlib.contextmanager
def running_server(app, http: str) -> Iterator[RunningServer]:
    """A uvicorn server on 127.0.0.1 in a background thread, stopped and joined on exit."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Small receive buffers make "the server stopped reading" visible to a client within a few hundred KiB.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http=http,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    loop = uvloop.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name=f"uvicorn-{http}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + IO_TIMEOUT_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield RunningServer(http=http, port=sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(IO_TIMEOUT_S)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def middlewares():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAAS_HTTP_HEADER_TIMEOUT_S", str(HEADER_TIMEOUT_S))
        patch.setenv("MAAS_HTTP_MAX_HEADER_BYTES", str(MAX_HEADER_BYTES))
        patch.setenv("MAAS_MAX_REQUEST_TIMEOUT_S", "30")
        patch.setenv("MAAS_HTTP_ADMISSION", json.dumps({"/slow": 1}))
        patch.setattr(proxy, "_header_timeout_s", proxy._header_timeout_s)
        patch.setattr(proxy, "_max_header_bytes", proxy._max_header_bytes)
        try:
            yield proxy.hardening()
        finally:
            proxy.uninstall_header_deadline()


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def server(request, middlewares) -> Iterator[RunningServer]:
    with running_server(_apply_middlewares(echo_app, middlewares), request.param) as running:
        yield running


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class RawClient:
    """One TCP connection that speaks HTTP/1.1 by hand."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.buffer = b""

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, path: str = "/", headers: dict[str, str] | None = None) -> None:
        lines = [f"GET {path} HTTP/1.1", "host: test"] + [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def readable_within(self, seconds: float) -> bool:
        return bool(self.buffer) or bool(select.select([self.sock], [], [], seconds)[0])

    def _receive(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return chunk

    def read_response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            assert self._receive(), f"connection closed before a response; got {self.buffer[:200]!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            assert self._receive(), "connection closed inside a response body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status=int(status_line.split()[1]), headers=headers, body=body)

    def read_until_closed(self) -> bytes:
        """Everything the server sends until it closes (FIN, or RST after unread data)."""
        try:
            while self._receive():
                pass
        except ConnectionResetError:
            pass
        data, self.buffer = self.buffer, b""
        return data

    def is_open(self) -> bool:
        """No data and no close waiting on the connection."""
        return not self.readable_within(0)


def assert_request_timeout(answer: bytes) -> None:
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:200]
    assert b"\r\nconnection: close\r\n" in answer


def assert_cut_off_in_time(elapsed_s: float) -> None:
    low, high = CUT_OFF_BOUNDS_S
    assert low <= elapsed_s < high, f"cut off after {elapsed_s:.3f} s, expected within [{low}, {high})"


# The header-read deadline


@pytest.mark.parametrize("after_a_response", [False, True], ids=["new-connection", "kept-alive"])
def test_a_head_sent_byte_by_byte_gets_408_and_is_disconnected(server, after_a_response):
    head = b"GET / HTTP/1.1\r\nhost: test\r\nuser-agent: one-byte-at-a-time\r\n\r\n"
    with RawClient(server.port) as client:
        if after_a_response:
            client.request()
            assert client.read_response().status == 200
        started = time.monotonic()
        for byte in head:
            client.send(bytes([byte]))
            if client.readable_within(BYTE_INTERVAL_S):
                break
        else:
            pytest.fail("the whole head went through one byte at a time")
        answer = client.read_until_closed()
        elapsed_s = time.monotonic() - started
    assert_request_timeout(answer)
    assert_cut_off_in_time(elapsed_s)


def test_a_silent_connection_is_disconnected(server):
    with RawClient(server.port) as client:
        started = time.monotonic()
        answer = client.read_until_closed()
        elapsed_s = time.monotonic() - started
    assert_request_timeout(answer)
    assert_cut_off_in_time(elapsed_s)


def test_an_idle_kept_alive_connection_is_left_to_keep_alive(server):
    with RawClient(server.port) as client:
        client.request()
        assert client.read_response().status == 200
        time.sleep(1.5 * HEADER_TIMEOUT_S)
        assert client.is_open()
        client.request()
        assert client.read_response().status == 200


def test_a_handler_slower_than_the_header_timeout_still_answers(server):
    with RawClient(server.port) as client:
        started = time.monotonic()
        client.request("/slow")
        response = client.read_response()
        assert response.status == 200
        # Answered after the header deadline would have fired. (Not ">= SLOW_HANDLER_S": libuv keeps time in
        # whole milliseconds, so uvloop's sleep can end up to 1 ms early by time.monotonic().)
        assert time.monotonic() - started > HEADER_TIMEOUT_S
        assert client.is_open()


def test_a_websocket_outlives_the_header_timeout(server):
    upgrade = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
    }
    with RawClient(server.port) as client:
        client.request("/ws", upgrade)
        assert client.read_response().status == 101
        time.sleep(1.5 * HEADER_TIMEOUT_S)
        assert client.is_open()
        mask, payload = b"\x01\x02\x03\x04", b"ping"
        client.send(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while len(client.buffer) < 2 + len(payload):
            assert client._receive(), "websocket closed before echoing"
        assert client.buffer[: 2 + len(payload)] == bytes([0x81, len(payload)]) + payload


# The header-size cap


def test_an_oversized_head_gets_431(server):
    with RawClient(server.port) as client:
        started = time.monotonic()
        client.send(b"GET / HTTP/1.1\r\nhost: test\r\nx-filler: " + b"a" * (MAX_HEADER_BYTES + 4096))
        answer = client.read_until_closed()
        elapsed_s = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert elapsed_s < HEADER_TIMEOUT_S


def test_the_rest_of_a_body_answered_early_is_not_taken_for_the_next_head(server):
    """A body the app refused unread (413) still arrives after the response; it is not a request head."""
    body = b"x" * (8 * MAX_HEADER_BYTES)
    with RawClient(server.port) as client:
        sender = threading.Thread(
            target=client.send,
            args=(b"POST /early HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % len(body) + body,),
        )
        sender.start()
        assert client.read_response().status == 413
        sender.join(IO_TIMEOUT_S)
        try:
            client.request()
            answer = client.read_response().status
        except (AssertionError, OSError):
            answer = None  # the server may close a connection whose body it did not read; it must not say 431
        assert answer in (200, None), answer


def test_a_head_under_the_cap_is_served(server):
    with RawClient(server.port) as client:
        client.request(headers={"x-filler": "a" * (MAX_HEADER_BYTES - 1024)})
        assert client.read_response().status == 200


def test_a_pipelined_head_is_not_read_while_a_response_is_in_flight(server):
    with RawClient(server.port) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        client.request("/slow")
        client.send(b"GET / HTTP/1.1\r\nhost: test\r\nx-filler: ")
        client.sock.setblocking(False)
        chunk, accepted = b"a" * 65536, 0
        pump_until = time.monotonic() + 0.8 * SLOW_HANDLER_S
        while time.monotonic() < pump_until:
            try:
                accepted += client.sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.005)
        client.sock.setblocking(True)
        client.sock.settimeout(IO_TIMEOUT_S)
        assert client.read_response().status == 200
        answer = client.read_until_closed()
    # Unread, this is bounded by one read of the server plus the two socket buffers; read, it grows by
    # hundreds of MiB a second.
    assert accepted < 2 * 1024 * 1024
    # h11 refuses the buffered head itself (400) once it exceeds its 16 KiB; httptools gets our 431.
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), answer[:200]


# Client headers


@pytest.mark.parametrize("request_id", ["abc-123", "A.b_c:d-9", "7f3c2e1a-0000-4000-8000-000000000000", "x" * 64])
def test_a_well_formed_request_id_reaches_the_app_and_comes_back(server, request_id):
    with RawClient(server.port) as client:
        client.request(headers={"x-request-id": request_id})
        response = client.read_response()
    assert dict(json.loads(response.body))["x-request-id"] == request_id
    assert response.headers["x-request-id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    ["x" * 65, "x" * 5000, "", "a/b", "a b", "<script>alert(1)</script>", "id;drop", "ünïcode"],
    ids=["65-chars", "5000-chars", "empty", "slash", "space", "markup", "semicolon", "non-ascii"],
)
def test_a_long_or_odd_request_id_is_replaced(server, request_id):
    with RawClient(server.port) as client:
        client.request(headers={"x-request-id": request_id})
        response = client.read_response()
    seen_id = dict(json.loads(response.body))["x-request-id"]
    assert seen_id != request_id
    assert response.headers["x-request-id"] == seen_id


@pytest.mark.parametrize("timeout", ["5", "0.5", "30"])
def test_a_shorter_request_timeout_is_kept(server, timeout):
    with RawClient(server.port) as client:
        client.request(headers={"x-request-timeout-seconds": timeout})
        seen = dict(json.loads(client.read_response().body))
    assert seen["x-request-timeout-seconds"] == timeout


@pytest.mark.parametrize("timeout", ["0", "-1", "1e9", "30.5", "abc", "nan", "inf", ""])
def test_a_disabling_longer_or_malformed_request_timeout_is_dropped(server, timeout):
    with RawClient(server.port) as client:
        client.request(headers={"x-request-timeout-seconds": timeout})
        seen = dict(json.loads(client.read_response().body))
    assert "x-request-timeout-seconds" not in seen


@pytest.mark.parametrize(("sent", "seen"), [(None, "300"), ("120", "120"), ("1e9", "300"), ("0", "300")])
def test_language_model_answers_get_the_generation_timeout_unless_the_client_asks_for_less(server, sent, seen):
    with RawClient(server.port) as client:
        client.request("/v1/chat/completions", headers={} if sent is None else {"x-request-timeout-seconds": sent})
        headers = json.loads(client.read_response().body)
    assert [value for name, value in headers if name == "x-request-timeout-seconds"] == [seen]


def test_a_client_cannot_keep_its_request_running_after_hanging_up(server):
    with RawClient(server.port) as client:
        client.request(headers={"x-request-disconnect-disabled": "?1"})
        seen = dict(json.loads(client.read_response().body))
    assert "x-request-disconnect-disabled" not in seen


@pytest.mark.parametrize("forged", [None, "0", "1e12", "yesterday"])
def test_the_app_learns_when_the_proxy_received_the_request_and_clients_cannot_say_otherwise(server, forged):
    before = time.time()
    with RawClient(server.port) as client:
        client.request(headers={} if forged is None else {"x-maas-received-at": forged})
        seen = json.loads(client.read_response().body)
    stamps = [float(value) for name, value in seen if name == "x-maas-received-at"]
    assert len(stamps) == 1 and before <= stamps[0] <= time.time()


# Admission


def test_a_path_at_its_limit_refuses_the_next_request_at_once_and_admits_again_after(server):
    with RawClient(server.port) as first, RawClient(server.port) as second:
        first.request("/slow")
        time.sleep(0.2)  # the first request is in the app, holding the only slot
        started = time.monotonic()
        second.request("/slow", headers={"x-request-id": "second-1"})
        refused = second.read_response()
        refused_after_s = time.monotonic() - started
        assert refused.status == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-request-id"] == "second-1"
        assert refused.headers["server-timing"].startswith("proxy;dur=")
        (detail,) = json.loads(refused.body)["detail"]
        assert detail["type"] == "overloaded" and "/slow" in detail["msg"] and "limit of 1" in detail["msg"]
        assert refused_after_s < SLOW_HANDLER_S, "the refusal waited for the admitted request"
        assert first.read_response().status == 200
        # The slot is free again, and the refused connection is still usable.
        second.request("/slow")
        assert second.read_response().status == 200


def test_paths_without_a_limit_are_not_bounded(server):
    with RawClient(server.port) as slow, RawClient(server.port) as other:
        slow.request("/slow")
        time.sleep(0.2)
        other.request("/healthz")
        assert other.read_response().status == 200
        assert slow.read_response().status == 200


def test_a_refused_request_with_a_body_leaves_the_connection_usable(server):
    body = b"x" * 200_000
    with RawClient(server.port) as first, RawClient(server.port) as second:
        first.request("/slow")
        time.sleep(0.2)
        second.send(b"POST /slow HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        assert second.read_response().status == 503
        assert first.read_response().status == 200
        second.request("/")
        assert second.read_response().status == 200


@pytest.mark.parametrize(
    "value", ['{"/x": 0}', '{"x": 3}', '{"/x": "many"}', "[1]"], ids=["zero", "no-slash", "not-a-number", "not-a-map"]
)
def test_bad_admission_settings_are_refused_at_start(monkeypatch, value):
    monkeypatch.setenv("MAAS_HTTP_ADMISSION", value)
    with pytest.raises(ValueError):
        proxy.ProxySettings()


def test_the_default_admission_covers_every_route_the_ingress_admits(monkeypatch):
    from api.policy import declared_routes

    monkeypatch.delenv("MAAS_HTTP_ADMISSION", raising=False)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    limits = proxy.ProxySettings().admission_limits()
    assert limits == declared_routes().proxy_limits()
    assert set(limits) == set(declared_routes().ingress_limits())
    assert limits["/v1/vision/classify"] == 48 and limits["/v2/models/{model_name}/infer"] == 48
    # Behind HAProxy it runs in each ingress replica's server: the ingress's own limits per replica, so that its
    # refusal (before Serve handles the request) comes before the ingress's.
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    assert proxy.ProxySettings().admission_limits() == declared_routes().ingress_limits()
    assert proxy.ProxySettings().admission_limits()["/v1/vision/classify"] == 24
    monkeypatch.setenv("MAAS_HTTP_ADMISSION", "{}")
    assert proxy.ProxySettings().admission_limits() == {}


# Wiring


def test_hardening_returns_what_serve_accepts_and_patches_uvicorn_once(middlewares):
    assert validate_http_proxy_callback_return(middlewares) == middlewares
    assert proxy.hardening()  # a second call, same environment
    for cls in proxy.uvicorn_http_protocol_classes():
        originals = vars(cls)[proxy.ORIGINAL_METHODS_ATTR]
        for name in proxy.WRAPPED_METHODS:
            assert getattr(cls, name).__wrapped__ is originals[name]
            assert not hasattr(originals[name], "__wrapped__")


def test_uvicorns_automatic_protocol_choice_is_patched():
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    assert AutoHTTPProtocol in proxy.uvicorn_http_protocol_classes()


def test_the_default_request_timeout_cap_matches_the_shipped_serve_configs(monkeypatch):
    monkeypatch.delenv("MAAS_MAX_REQUEST_TIMEOUT_S", raising=False)
    cap_s = proxy.ProxySettings().max_request_timeout_s
    rayservice = yaml.safe_load((ROOT / "kubernetes" / "rayservice.yaml").read_text())
    configs = {
        "serve_config.yaml": yaml.safe_load((ROOT / "serve_config.yaml").read_text()),
        "serve_config.gpu.yaml": yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text()),
        "kubernetes/rayservice.yaml": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }
    for name, config in configs.items():
        assert config["http_options"]["request_timeout_s"] == cap_s, name


class FakeCounter:
    created: list["FakeCounter"] = []

    def __init__(self, name, description="", tag_keys=None):
        self.name, self.description, self.tag_keys, self.counts = name, description, tag_keys, {}
        FakeCounter.created.append(self)

    def inc(self, value=1.0, tags=None):
        key = tuple(sorted((tags or {}).items()))
        self.counts[key] = self.counts.get(key, 0) + value


@pytest.fixture
def fake_counters(monkeypatch) -> list[FakeCounter]:
    import ray
    import ray.util.metrics

    FakeCounter.created = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util.metrics, "Counter", FakeCounter)
    monkeypatch.setattr(proxy, "_counters", {})
    return FakeCounter.created


def test_slow_clients_are_counted_inside_ray(middlewares, fake_counters):
    with running_server(_apply_middlewares(echo_app, middlewares), "httptools") as running:
        with RawClient(running.port) as first, RawClient(running.port) as second:
            assert_request_timeout(first.read_until_closed())
            assert_request_timeout(second.read_until_closed())
    (counter,) = fake_counters
    assert counter.name == "maas_http_slow_client_disconnects_total" and counter.description
    assert counter.counts == {(): 2}


def test_refusals_are_counted_by_route_inside_ray(middlewares, fake_counters):
    with running_server(_apply_middlewares(echo_app, middlewares), "httptools") as running:
        with RawClient(running.port) as first, RawClient(running.port) as second:
            first.request("/slow")
            time.sleep(0.2)
            for _ in range(2):
                second.request("/slow")
                assert second.read_response().status == 503
            assert first.read_response().status == 200
    (counter,) = fake_counters
    assert counter.name == "maas_http_proxy_refusals_total" and counter.tag_keys == ("route",)
    assert counter.counts == {(("route", "/slow"),): 2}


def test_a_refusal_is_in_the_error_shape_of_its_route_family():
    from deployments.admission import Admission, error_body

    admission = Admission({"/v2/models/{model_name}/infer": 2, "/v1/text/embed": 2, "/v1/embeddings": 2})
    v2 = json.loads(error_body("v2", admission.refusal("/v2/models/{model_name}/infer")))
    assert list(v2) == ["error"] and "limit of 2" in v2["error"]
    v1 = json.loads(error_body("v1", admission.refusal("/v1/text/embed")))
    assert v1["detail"][0]["type"] == "overloaded"
    openai = json.loads(error_body("openai", admission.refusal("/v1/embeddings")))
    assert openai["error"]["code"] == "overloaded" and openai["error"]["type"] == "server_error"


def test_a_models_paths_share_its_routes_count_and_each_is_refused_in_its_family(monkeypatch):
    """The proxy matches a path to its route's template: every model's infer path, versioned or not, counts
    against the one limit of /v2/models/{model_name}/infer, and is refused in the protocol's shape."""
    import asyncio

    from api.policy import declared_routes
    from deployments.admission import AdmissionMiddleware

    held = asyncio.Event()

    async def app(scope, receive, send):
        await held.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AdmissionMiddleware(app, {"/v2/models/{model_name}/infer": 1}, routes=declared_routes())

    async def call(path: str) -> tuple[int, bytes]:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "headers": []}
        await middleware(scope, None, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    async def scenario():
        first = asyncio.create_task(call("/v2/models/vision/infer"))
        await asyncio.sleep(0.01)
        refused = [await call("/v2/models/text/infer"), await call("/v2/models/text/versions/x/y/infer")]
        passed = await call("/v2/models/text/ready")  # no limit: it would wait for the held app
        return first, refused, passed

    async def run():
        task = asyncio.create_task(scenario())
        await asyncio.sleep(0.05)
        held.set()
        first, refused, passed = await task
        return await first, refused, passed

    first, refused, passed = asyncio.run(run())
    assert first[0] == 200 and passed[0] == 200
    for status, body in refused:
        assert status == 503 and "limit of 1" in json.loads(body)["error"]


async def _answer_204(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _route_header_of(app, path: str) -> str | None:
    import httpx

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return (await client.post(path)).headers.get("x-maas-route")

    return asyncio.run(ask())


def test_behind_haproxy_each_response_names_its_route_template_for_haproxys_metrics(monkeypatch):
    """HAProxy labels Serve's request counter with it and removes it (deployments.haproxy); a path of no route
    gets none, so no client-chosen text becomes a label."""
    monkeypatch.setattr(proxy, "install_header_deadline", lambda *_: [])  # uvicorn left as the fixtures have it
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    middlewares = proxy.hardening()
    assert middlewares[-1].cls is proxy.RouteHeader  # outermost: it sees Serve's own 408 and 503 too
    app = _apply_middlewares(_answer_204, middlewares)
    assert _route_header_of(app, "/v2/models/text/infer") == "/v2/models/{model_name}/infer"
    assert _route_header_of(app, "/v1/vision/classify") == "/v1/vision/classify"
    assert _route_header_of(app, "/v1/no/such/route") is None
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    assert not any(m.cls is proxy.RouteHeader for m in proxy.hardening())
