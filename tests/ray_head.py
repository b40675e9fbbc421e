"""Helpers for tests that start a real Ray head with cluster/start-local-head.sh."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = REPO / "cluster" / "start-local-head.sh"
STOP = REPO / "cluster" / "stop-local-head.sh"
WORKER_PORTS = range(10002, 20000)  # Ray's default --min/max-worker-port


def free_port() -> int:
    """A free port from the kernel's ephemeral range (32768+), so never a Ray worker port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert port not in WORKER_PORTS
    return port


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP listener on `port`, from /proc/net/tcp{,6} (hex, as stored)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


# 127.0.0.1 as /proc/net/tcp writes it (little-endian), and its IPv4-mapped IPv6 form.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
