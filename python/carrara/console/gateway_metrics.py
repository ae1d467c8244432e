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
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import msgspec

from carrara.errors import ConfigError

__all__ = [
    "GatewayScraper",
    "HttpFetch",
    "ReplicaStatus",
    "ReplicaTargets",
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


class ReplicaStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One gateway replica's part in a scrape."""

    url: str
    reachable: bool
    error: str


class ServingFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /serving/variants`` answers: the sums over the gateway's replicas that
    answered (``reachable``: at least one did; ``error`` names those that did not)."""

    gateway_url: str
    reachable: bool
    error: str
    scraped_at: float
    window_s: float  # the time the rates are over (0: one scrape only)
    variants: list[VariantFigures]
    errors: dict[str, float]  # model -> failed calls in the window (since start if no window)
    degraded: dict[str, float]  # model -> entities served degraded, likewise
    shed_total: float
    replicas: list[ReplicaStatus] = []


Fetch = Callable[[], str]


def _labels(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(pairs)


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # a restarted gateway counts from 0 again


class GatewayScraper:
    """Scrapes every gateway replica's /metrics text on each :meth:`figures` call, keeps each
    replica's samples of the last ``keep_s`` seconds, and answers the replicas' sums; thread-safe.

    ``fetch`` is one replica's fetch, or a callable answering the replicas to scrape now
    (name -> fetch; called on each scrape, so replicas may come and go)."""

    def __init__(
        self,
        gateway_url: str,
        fetch: Fetch | None = None,
        *,
        targets: Callable[[], Mapping[str, Fetch]] | None = None,
        keep_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (fetch is None) == (targets is None):
            raise ValueError("give a fetch or targets, not both")
        self.gateway_url = gateway_url
        if targets is None:
            assert fetch is not None
            one = fetch
            targets = lambda: {gateway_url: one}  # noqa: E731
        self._targets = targets
        self._keep_s = keep_s
        self._clock = clock
        self._samples: dict[str, deque[Sample]] = {}
        self._lock = threading.Lock()

    def _scrape(self) -> tuple[dict[str, Series], list[ReplicaStatus]]:
        try:
            targets = dict(self._targets())
        except Exception as exc:  # e.g. the replicas' DNS name does not resolve
            return {}, [ReplicaStatus(url=self.gateway_url, reachable=False, error=_why(exc))]
        if not targets:
            return {}, [ReplicaStatus(url=self.gateway_url, reachable=False, error="no replica")]

        def one(fetch: Fetch) -> Series | BaseException:
            try:
                return parse_metrics(fetch())
            except Exception as exc:  # an unreachable replica is a figure, not an API error
                return exc

        names = sorted(targets)
        if len(names) == 1:
            results = [one(targets[names[0]])]
        else:
            with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
                results = list(pool.map(one, [targets[n] for n in names]))
        series: dict[str, Series] = {}
        statuses: list[ReplicaStatus] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                statuses.append(ReplicaStatus(url=name, reachable=False, error=_why(result)))
            else:
                series[name] = result
                statuses.append(ReplicaStatus(url=name, reachable=True, error=""))
        return series, statuses

    def figures(self, window_s: float = 10.0) -> ServingFigures:
        now = self._clock()
        scraped, statuses = self._scrape()
        if not scraped:
            return ServingFigures(
                gateway_url=self.gateway_url,
                reachable=False,
                error="; ".join(
                    r.error if len(statuses) == 1 else f"{r.url}: {r.error}" for r in statuses
                ),
                scraped_at=now,
                window_s=0.0,
                variants=[],
                errors={},
                degraded={},
                shed_total=0.0,
                replicas=statuses,
            )
        moved: list[Series] = []
        spans: list[float] = []
        with self._lock:
            for name, series in scraped.items():
                self._samples.setdefault(name, deque()).append(Sample(now, series))
            for name in list(self._samples):
                samples = self._samples[name]
                while samples and samples[0].at < now - self._keep_s:
                    samples.popleft()
                if not samples:
                    del self._samples[name]  # a replica gone for a minute is forgotten
            for name in scraped:
                samples = self._samples[name]
                newest = samples[-1]
                # The oldest sample inside the window (not the newest one itself).
                base = next(
                    (s for s in samples if s.at >= now - window_s and s is not newest), None
                )
                if base is not None and newest.at > base.at:
                    moved.append(_window(newest, base))
                    spans.append(newest.at - base.at)
        totals = _sum(list(scraped.values()))
        span = sum(spans) / len(spans) if spans else 0.0
        return _figures(
            self.gateway_url, now, totals, _sum(moved) if moved else None, span, statuses
        )


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


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


def _window(newest: Sample, base: Sample) -> Series:
    """Each series' increase from ``base`` to ``newest`` (a counter that went down restarted)."""
    return {key: _delta(value, base.series.get(key, 0.0)) for key, value in newest.series.items()}


def _sum(parts: Sequence[Series]) -> Series:
    out: Series = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _figures(
    url: str,
    at: float,
    totals: Series,
    moved: Series | None,
    span: float,
    replicas: list[ReplicaStatus],
) -> ServingFigures:
    """Figures from the replicas' summed counters (``totals``) and, with a window, their summed
    increases over it (``moved``, ``span`` seconds)."""
    keys = ("model", "variant", "version")
    windowed = moved is not None and span > 0
    window: Series = moved if moved is not None and windowed else {}
    entities = _by_label(totals, "carrara_predictions_total", keys)
    requests = _by_label(totals, "carrara_predict_latency_seconds_count", keys)
    errors = _by_label(totals, "carrara_variant_errors_total", keys)
    degraded = _by_label(totals, "carrara_variant_degraded_total", keys)
    buckets = _buckets(totals)
    d_entities = _by_label(window, "carrara_predictions_total", keys)
    d_requests = _by_label(window, "carrara_predict_latency_seconds_count", keys)
    d_errors = _by_label(window, "carrara_variant_errors_total", keys)
    d_degraded = _by_label(window, "carrara_variant_degraded_total", keys)
    d_buckets = _buckets(window)
    per_model: dict[str, float] = {}
    for key, value in d_entities.items():
        per_model[key[0]] = per_model.get(key[0], 0.0) + value
    variants: list[VariantFigures] = []
    for key in sorted(set(entities) | set(requests) | set(errors)):
        model, variant, version = key
        window_buckets = buckets.get((model, variant, version), [])
        diff = d_buckets.get((model, variant, version), [])
        if windowed and diff and diff[-1][1] > 0:
            window_buckets = diff
        moved_entities = d_entities.get(key, 0.0)
        variants.append(
            VariantFigures(
                model=model,
                variant=variant,
                version=int(float(version or 0)),
                entities_total=entities.get(key, 0.0),
                requests_total=requests.get(key, 0.0),
                entities_per_s=round(moved_entities / span, 3) if windowed else None,
                requests_per_s=round(d_requests.get(key, 0.0) / span, 3) if windowed else None,
                share=(
                    round(moved_entities / per_model[model], 4)
                    if windowed and per_model.get(model, 0.0) > 0
                    else None
                ),
                p50_ms=_ms(quantile(0.5, window_buckets)),
                p99_ms=_ms(quantile(0.99, window_buckets)),
                errors=d_errors.get(key, 0.0) if windowed else errors.get(key, 0.0),
                errors_total=errors.get(key, 0.0),
                degraded=d_degraded.get(key, 0.0) if windowed else degraded.get(key, 0.0),
                degraded_total=degraded.get(key, 0.0),
            )
        )

    def per_model_counter(name: str) -> dict[str, float]:
        now = _by_label(totals, name, ("model",))
        if not windowed:
            return {k[0]: v for k, v in now.items()}
        moved_now = _by_label(window, name, ("model",))
        return {k[0]: moved_now.get(k, 0.0) for k in now}

    shed = sum(v for (n, _), v in totals.items() if n == "carrara_predict_shed_total")
    return ServingFigures(
        gateway_url=url,
        reachable=True,
        error="; ".join(f"{r.url}: {r.error}" for r in replicas if not r.reachable),
        scraped_at=at,
        window_s=round(span, 3) if windowed else 0.0,
        variants=variants,
        errors=per_model_counter("carrara_predict_errors_total"),
        degraded=per_model_counter("carrara_predict_degraded_total"),
        shed_total=shed,
        replicas=replicas,
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


class ReplicaTargets:
    """The gateway replicas to scrape (a ``targets`` for :class:`GatewayScraper`): base URLs,
    and ``dns+http://NAME:PORT`` entries, resolved at each scrape to every address of NAME (a
    Kubernetes headless Service lists its ready pods so). One :class:`HttpFetch` per replica,
    closed when the replica is no longer listed."""

    def __init__(
        self,
        urls: Sequence[str],
        headers: Mapping[str, str],
        verify: str | bool,
        *,
        resolve: Callable[..., list[Any]] = socket.getaddrinfo,
    ) -> None:
        self.urls: list[str] = []
        for raw in urls:
            url = raw.strip().rstrip("/")
            if not url:
                continue
            parts = urlsplit(url)
            scheme = parts.scheme
            if scheme == "dns+https":
                raise ConfigError(
                    f"{url}: dns+ discovery scrapes each address over plain HTTP; for a gateway "
                    "with TLS list each replica's https:// URL"
                )
            if scheme not in ("http", "https", "dns+http"):
                raise ConfigError(f"gateway metrics URL {raw!r} must be http(s):// or dns+http://")
            if parts.hostname is None:
                raise ConfigError(f"gateway metrics URL {raw!r} names no host")
            self.urls.append(url)
        if not self.urls:
            raise ConfigError("no gateway metrics URL given")
        self._headers = dict(headers)
        self._verify = verify
        self._resolve = resolve
        self._fetches: dict[str, HttpFetch] = {}
        self._lock = threading.Lock()

    def _expand(self) -> list[str]:
        out: list[str] = []
        for url in self.urls:
            if not url.startswith("dns+"):
                out.append(url)
                continue
            parts = urlsplit(url[4:])
            port = parts.port or 80
            infos = self._resolve(parts.hostname, port, type=socket.SOCK_STREAM)
            for address in sorted({str(info[4][0]) for info in infos}):
                host = f"[{address}]" if ":" in address else address
                out.append(f"http://{host}:{port}")
        return list(dict.fromkeys(out))

    def __call__(self) -> dict[str, Fetch]:
        wanted = self._expand()
        with self._lock:
            for url in wanted:
                if url not in self._fetches:
                    self._fetches[url] = HttpFetch(url, self._headers, self._verify)
            for url in [u for u in self._fetches if u not in wanted]:
                self._fetches.pop(url).close()
            return {url: self._fetches[url] for url in wanted}

    def close(self) -> None:
        with self._lock:
            for fetch in self._fetches.values():
                fetch.close()
            self._fetches.clear()
