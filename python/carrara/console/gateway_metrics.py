"""The gateway's live figures per variant, for the console's Deployments page.

The control plane scrapes the gateway's Prometheus ``/metrics`` (the figures its engine counts
in C++) on each call and keeps the scrapes of the last minute; a figure over a window is the
difference between the newest scrape and the oldest one inside the window: entities predicted
per second per variant (and so the observed traffic split), latency p50/p99 from the
histogram's bucket deltas (interpolated inside a bucket, as Prometheus' ``histogram_quantile``
does), each variant's errors (times it failed to answer, a fallback perhaps answering for it)
and degraded entities, and the failed calls and degraded entities per model. Several browsers
polling at once share the same samples, so none of them disturbs another's rates.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import msgspec

__all__ = [
    "GatewayScraper",
    "HttpFetch",
    "Sample",
    "ServingFigures",
    "VariantFigures",
    "parse_metrics",
    "quantile",
]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

#: (name, sorted label pairs) -> value
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Series:
    """Prometheus text exposition as ``{(name, labels): value}`` (comments skipped)."""
    out: Series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        pairs = tuple(sorted(_LABEL.findall(labels or "")))
        try:
            out[(name, pairs)] = float(value)
        except ValueError:
            continue
    return out


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``(upper_bound, count)`` buckets (the last one +Inf),
    interpolated linearly inside its bucket; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bound: its bound is the best we know
            inside = count - below
            share = (rank - below) / inside if inside > 0 else 1.0
            return lower + (bound - lower) * share
        lower, below = bound, count
    return lower


class Sample(msgspec.Struct, frozen=True):
    """One scrape: when, and its series."""

    at: float
    series: Series


class VariantFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One variant over the window (``*_total``: since the gateway started)."""

    model: str
    variant: str
    version: int
    entities_total: float
    requests_total: float
    entities_per_s: float | None  # None until two scrapes span some time
    requests_per_s: float | None
    share: float | None  # this variant's part of its model's entities in the window
    p50_ms: float | None  # over the window when it saw requests, else since the start
    p99_ms: float | None
    #: Times the variant failed to answer (backend error or timeout, open breaker) in the
    #: window (since the start without one); a fallback may have answered for it.
    errors: float = 0.0
    errors_total: float = 0.0
    degraded: float = 0.0  # entities it answered degraded, in the window (likewise)
    degraded_total: float = 0.0


class ServingFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /serving/variants`` answers."""

    gateway_url: str
    reachable: bool
    error: str
    scraped_at: float
    window_s: float  # the time the rates are over (0: one scrape only)
    variants: list[VariantFigures]
    errors: dict[str, float]  # model -> failed calls in the window (since start if no window)
    degraded: dict[str, float]  # model -> entities served degraded, likewise
    shed_total: float


Fetch = Callable[[], str]


def _labels(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(pairs)


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # a restarted gateway counts from 0 again


class GatewayScraper:
    """Scrapes ``fetch()`` (the gateway's /metrics text) on each :meth:`figures` call and keeps
    the last ``keep_s`` seconds of samples; thread-safe."""

    def __init__(
        self,
        gateway_url: str,
        fetch: Fetch,
        *,
        keep_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway_url = gateway_url
        self._fetch = fetch
        self._keep_s = keep_s
        self._clock = clock
        self._samples: deque[Sample] = deque()
        self._lock = threading.Lock()

    def figures(self, window_s: float = 10.0) -> ServingFigures:
        now = self._clock()
        try:
            text = self._fetch()
        except Exception as exc:  # an unreachable gateway is a figure, not an API error
            return ServingFigures(
                gateway_url=self.gateway_url,
                reachable=False,
                error=str(exc) or type(exc).__name__,
                scraped_at=now,
                window_s=0.0,
                variants=[],
                errors={},
                degraded={},
                shed_total=0.0,
            )
        newest = Sample(now, parse_metrics(text))
        with self._lock:
            self._samples.append(newest)
            while self._samples and self._samples[0].at < now - self._keep_s:
                self._samples.popleft()
            # The oldest sample inside the window (not the newest one itself).
            base = next(
                (s for s in self._samples if s.at >= now - window_s and s is not newest), None
            )
        return _figures(self.gateway_url, newest, base)


def _by_label(series: Series, name: str, keys: Sequence[str]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for (n, pairs), value in series.items():
        if n == name:
            labels = _labels(pairs)
            out[tuple(labels.get(k, "") for k in keys)] = value
    return out


def _buckets(series: Series) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    out: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for (n, pairs), value in series.items():
        if n != "carrara_predict_latency_seconds_bucket":
            continue
        labels = _labels(pairs)
        key = (labels.get("model", ""), labels.get("variant", ""), labels.get("version", ""))
        bound = math.inf if labels.get("le") == "+Inf" else float(labels.get("le", "inf"))
        out.setdefault(key, []).append((bound, value))
    for values in out.values():
        values.sort()
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def _figures(url: str, newest: Sample, base: Sample | None) -> ServingFigures:
    keys = ("model", "variant", "version")
    entities = _by_label(newest.series, "carrara_predictions_total", keys)
    requests = _by_label(newest.series, "carrara_predict_latency_seconds_count", keys)
    errors = _by_label(newest.series, "carrara_variant_errors_total", keys)
    degraded = _by_label(newest.series, "carrara_variant_degraded_total", keys)
    old_errors = _by_label(base.series, "carrara_variant_errors_total", keys) if base else {}
    old_degraded = _by_label(base.series, "carrara_variant_degraded_total", keys) if base else {}
    buckets = _buckets(newest.series)
    span = newest.at - base.at if base is not None else 0.0
    old_entities = _by_label(base.series, "carrara_predictions_total", keys) if base else {}
    old_requests = (
        _by_label(base.series, "carrara_predict_latency_seconds_count", keys) if base else {}
    )
    old_buckets = _buckets(base.series) if base else {}
    windowed = base is not None and span > 0
    moved: dict[tuple[str, ...], float] = {}
    for key, value in entities.items():
        moved[key] = _delta(value, old_entities.get(key, 0.0)) if windowed else 0.0
    per_model: dict[str, float] = {}
    for key, value in moved.items():
        per_model[key[0]] = per_model.get(key[0], 0.0) + value
    variants: list[VariantFigures] = []
    for key in sorted(set(entities) | set(requests) | set(errors)):
        model, variant, version = key
        cumulative = buckets.get((model, variant, version), [])
        window_buckets = cumulative
        if windowed:
            old = dict(old_buckets.get((model, variant, version), []))
            diff = [(b, _delta(c, old.get(b, 0.0))) for b, c in cumulative]
            if diff and diff[-1][1] > 0:
                window_buckets = diff
        d_entities = moved.get(key, 0.0)
        d_requests = _delta(requests.get(key, 0.0), old_requests.get(key, 0.0))
        variants.append(
            VariantFigures(
                model=model,
                variant=variant,
                version=int(float(version or 0)),
                entities_total=entities.get(key, 0.0),
                requests_total=requests.get(key, 0.0),
                entities_per_s=round(d_entities / span, 3) if windowed else None,
                requests_per_s=round(d_requests / span, 3) if windowed else None,
                share=(
                    round(d_entities / per_model[model], 4)
                    if windowed and per_model.get(model, 0.0) > 0
                    else None
                ),
                p50_ms=_ms(quantile(0.5, window_buckets)),
                p99_ms=_ms(quantile(0.99, window_buckets)),
                errors=(
                    _delta(errors.get(key, 0.0), old_errors.get(key, 0.0))
                    if windowed
                    else errors.get(key, 0.0)
                ),
                errors_total=errors.get(key, 0.0),
                degraded=(
                    _delta(degraded.get(key, 0.0), old_degraded.get(key, 0.0))
                    if windowed
                    else degraded.get(key, 0.0)
                ),
                degraded_total=degraded.get(key, 0.0),
            )
        )

    def per_model_counter(name: str) -> dict[str, float]:
        now = _by_label(newest.series, name, ("model",))
        before = _by_label(base.series, name, ("model",)) if base else {}
        return {k[0]: (_delta(v, before.get(k, 0.0)) if windowed else v) for k, v in now.items()}

    shed = sum(v for (n, _), v in newest.series.items() if n == "carrara_predict_shed_total")
    return ServingFigures(
        gateway_url=url,
        reachable=True,
        error="",
        scraped_at=newest.at,
        window_s=round(span, 3) if windowed else 0.0,
        variants=variants,
        errors=per_model_counter("carrara_predict_errors_total"),
        degraded=per_model_counter("carrara_predict_degraded_total"),
        shed_total=shed,
    )


class HttpFetch:
    """A fetch of ``{url}/metrics`` over one httpx client (2 s timeout); ``close()`` ends it."""

    def __init__(self, url: str, headers: Mapping[str, str], verify: str | bool) -> None:
        import httpx

        self.url = f"{url.rstrip('/')}/metrics"
        self.client = httpx.Client(timeout=2.0, headers=dict(headers), verify=verify)

    def __call__(self) -> str:
        r = self.client.get(self.url)
        r.raise_for_status()
        return r.text

    def close(self) -> None:
        self.client.close()
