"""Ports for a listener another process opens later (a child server, torchrun's store).

Probing with ``bind(port 0)`` hands out a port from the kernel's ephemeral range and releases
it; until the child binds it (seconds later, after its imports), any outgoing connection on the
machine may be given that very port as its local end, and the child then fails with "address
already in use". A port *below* the ephemeral range is never handed to an outgoing connection,
so :func:`free_port` picks one there (at random, checked free now) when the range leaves room,
and falls back to the kernel's choice otherwise.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from pathlib import Path

__all__ = ["ephemeral_range", "free_port"]

#: The lowest port :func:`free_port` picks below the ephemeral range (clear of the well-known
#: and most registered service ports).
LOWEST = 20_000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_random = random.SystemRandom()
#: Ports this process handed out lately: two probes before either listener binds must not
#: return the same port.
_recent: deque[int] = deque(maxlen=256)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; else its default)."""
    try:
        low, high = (int(x) for x in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, tries: int = 64) -> int:
    """A TCP port free on ``host`` now, for a listener another process opens soon: outside
    the ephemeral range when there is room below it (see the module docstring)."""
    low, _ = ephemeral_range()
    if low - LOWEST >= 1_000:
        for _ in range(tries):
            port = _random.randrange(LOWEST, low)
            if port not in _recent and _bindable(host, port):
                _recent.append(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _recent.append(port)
    return port
