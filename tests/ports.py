"""Free ports for the servers the tests start (HAProxy's own listeners, Serve's fallback proxy, test backends).

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from its
ephemeral range, which every outgoing connection on the machine draws from too:
between the choice and the server's own bind, a Ray process's connection can
take it, and the server then fails to start with "Address already in use" (seen
once, for HAProxy's statistics listener in the multi-node suite). So the ports
come from below that range, above the ports Ray gives its workers.
"""

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 20_000  # Ray's default worker ports are 10002-19999
EPHEMERAL_START = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])  # 32768 by default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` ("" for every interface), outside the ranges other processes take
    ports from on their own."""
    for _ in range(200):
        port = random.randrange(RAY_WORKER_PORTS_END, EPHEMERAL_START)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {RAY_WORKER_PORTS_END} and {EPHEMERAL_START}")
