"""Ports for a listener a child opens later: free now, below the ephemeral range, distinct."""

from __future__ import annotations

import socket

import pytest

from carrara import ports


def test_ports_are_free_below_the_ephemeral_range_and_distinct() -> None:
    low, high = ports.ephemeral_range()
    assert 0 < low <= high
    picked = [ports.free_port("127.0.0.1") for _ in range(50)]
    assert len(set(picked)) == 50
    assert all(ports.LOWEST <= p < low for p in picked)
    for p in picked[:5]:  # each can be bound (nothing else holds it)
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        choices = iter([taken, taken + 1])
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (taken + 5_000, 65_535))
        monkeypatch.setattr(ports, "LOWEST", 1_024)
        monkeypatch.setattr(ports._random, "randrange", lambda a, b: next(choices))
        assert ports.free_port("127.0.0.1") == taken + 1


def test_without_room_below_the_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1_024, 65_535))
    port = ports.free_port("127.0.0.1")
    assert 1_024 <= port <= 65_535
    with pytest.raises(OSError):
        ports.free_port("192.0.2.1")  # not an address of this machine
