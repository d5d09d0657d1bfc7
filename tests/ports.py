"""Free loopback ports for the brokers and servers the test tiers start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, below the kernel's ephemeral range: a port the kernel
    handed out for a bind to port 0 may be taken by any outgoing connection before the
    broker or registry binds it (seen here: a registry's port, two listeners of one
    broker). Each candidate is bound, and held until all are chosen."""
    low = _ephemeral_low()
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(count * 200):  # bounded: a few tries each
            if len(chosen) == count:
                break
            port = random.randrange(max(1024, low - 12_000), low - 1)
            if port in chosen or port + 1 in chosen or port - 1 in chosen:
                continue  # the registry takes port + 1 too
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            chosen.append(port)
        if len(chosen) < count:
            raise RuntimeError(f"found {len(chosen)} of {count} free ports below {low}")
        return chosen
    finally:
        for sock in held:
            sock.close()


def _ephemeral_low() -> int:
    """The low end of the kernel's ephemeral port range (Linux's default 32768)."""
    try:
        return int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
