"""Arrival schedules (open loop) and entity-id distributions (cache realism).

Schedules are computed up front as intended send offsets, so the client's lateness never moves
them: latency is measured from the intended time (no coordinated omission).
"""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

__all__ = ["EntitySampler", "EntitySpec", "arrival_offsets"]

Arrivals = Literal["poisson", "constant"]


def arrival_offsets(
    rate: float,
    duration_s: float,
    arrivals: Arrivals,
    rng: np.random.Generator,
    *,
    phase: float = 0.0,
) -> NDArray[np.int64]:
    """Intended send times in ns from the start, for ``rate`` req/s over ``duration_s``.

    ``phase`` in [0, 1) shifts a constant schedule by that fraction of one interval, so P
    worker processes at ``rate / P`` each interleave into one evenly spaced stream; Poisson
    streams superpose into a Poisson stream of the summed rate on their own.
    """
    if rate <= 0 or duration_s <= 0:
        return np.zeros(0, dtype=np.int64)
    if arrivals == "constant":
        n = int(np.floor(rate * duration_s - phase)) + 1
        t = (np.arange(n, dtype=np.float64) + phase) / rate
    elif arrivals == "poisson":
        expected = rate * duration_s
        n = int(expected + 6 * np.sqrt(expected) + 16)
        t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    else:
        raise ValueError(f"unknown arrival process {arrivals!r}; known: poisson, constant")
    t = t[t < duration_s]
    return (t * 1e9).astype(np.int64)


class EntitySpec(msgspec.Struct, frozen=True, kw_only=True):
    """Which entity ids requests carry: ``{prefix}{k}`` with k in [offset, offset + count).

    ``zipf`` draws rank k with probability ∝ 1 / (k + 1) ** zipf_s (k = 0 the hottest), the
    skew of real traffic where a few entities take most requests and a cache helps.
    """

    distribution: Literal["uniform", "zipf"] = "uniform"
    count: int = 1_000
    zipf_s: float = 1.1
    prefix: str = "e"
    offset: int = 0

    def describe(self) -> str:
        dist = f"zipf(s={self.zipf_s})" if self.distribution == "zipf" else "uniform"
        return f"{dist} over {self.count} ids {self.prefix}{self.offset}.."


class EntitySampler:
    """Draws batches of entity ids from an ``EntitySpec``."""

    def __init__(self, spec: EntitySpec, seed: int) -> None:
        if spec.count < 1:
            raise ValueError("entity count must be at least 1")
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self._cdf: NDArray[np.float64] | None = None
        if spec.distribution == "zipf":
            w = 1.0 / np.power(np.arange(1, spec.count + 1, dtype=np.float64), spec.zipf_s)
            self._cdf = np.cumsum(w) / w.sum()
        elif spec.distribution != "uniform":
            raise ValueError(f"unknown entity distribution {spec.distribution!r}")
        self.names = [f"{spec.prefix}{spec.offset + k}" for k in range(spec.count)]

    def ranks(self, n: int) -> NDArray[np.int64]:
        if self._cdf is None:
            return self.rng.integers(0, self.spec.count, size=n, dtype=np.int64)
        idx = np.searchsorted(self._cdf, self.rng.random(n), side="right")
        return np.minimum(idx, self.spec.count - 1).astype(np.int64)

    def ids(self, n: int) -> list[str]:
        names = self.names
        return [names[k] for k in self.ranks(n).tolist()]
