"""``carrara demo``: the whole issue-#9 loop through ``carrara.Platform``.

In a temporary folder (or ``--path``), on embedded defaults or on real PostgreSQL + Redis
(``--backend postgres,redis``, an isolated schema and key prefix per run, dropped at the end):

1. generate ride and payment events for N riders (per-rider activity, fares, cancellations,
   payment declines), aggregate them per rider and day, apply two feature groups, ingest and
   materialize them; churn labels depend on the features (plus noise, so AUC is ~0.8);
2. train two versions through the training queue on a point-in-time training set (label rows
   subsampled, ``--train-rows``): v1 XGBoost, v2 a PyTorch MLP with early stopping, each
   exported to ONNX with parity checked by the worker;
3. gate (AUC) and promote the better one, deploy a 90/10 split (promoted / other), serve it
   embedded and over the gateway's gRPC front under open-loop load runs (the load harness);
4. register an ``alert`` training trigger on the model, shift one feature, let the monitor
   raise a drift alert naming it; the trigger submits a retraining job which the worker runs on
   data including the shifted period; the new version is registered, gated and promoted.

Every stage has a check; the exit code is 0 only when all of them hold. :func:`demo_report`
returns the numbers as a :class:`DemoReport` (the tests assert on it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from carrara.config import Settings
    from carrara.platform import Platform
    from carrara.training.queue import Job
    from carrara.training.spec import JobSpec

__all__ = [
    "BACKENDS",
    "DemoReport",
    "DriftInfo",
    "RetrainInfo",
    "StageResult",
    "VersionInfo",
    "demo_report",
    "run_demo",
    "split_tolerance",
]

MODEL = "rider_churn"
SHIFTED = "avg_fare"
DAY_US = 86_400_000_000
DAYS = 4
TRIP_FEATURES = ("ride_count", "avg_fare", "cancel_rate")
PAY_FEATURES = ("avg_amount", "decline_rate")
FEATURE_REFS = [f"trips:{f}" for f in TRIP_FEATURES] + [f"payments:{f}" for f in PAY_FEATURES]
CANARY_SHARE = 0.10
AUC_GATE = 0.65
WINDOW_MS = 1_000  # monitoring window: short, so a demo run spans a few
BACKENDS = ("postgres", "redis")
TRIGGER = "retrain-on-drift"

# The two versions the demo trains. The generic worker (``get_trainer(framework)``) trains
# xgboost and pytorch; while it has not landed, the demo falls back to two scikit-learn
# estimators (see ``_plan``) and says so in a "pending" stage.
PLANNED: tuple[tuple[str, str, dict[str, Any], bool], ...] = (
    # framework, estimator, params, early stopping
    (
        "xgboost",
        "gradient_boosting",
        {"n_estimators": 120, "max_depth": 4, "learning_rate": 0.1},
        False,
    ),
    ("pytorch", "mlp", {"epochs": 40, "batch_size": 256, "lr": 1e-3, "hidden": [32, 16]}, True),
)
FALLBACK: tuple[tuple[str, str, dict[str, Any], bool], ...] = (
    ("sklearn", "gradient_boosting", {"n_estimators": 60, "max_depth": 3}, False),
    ("sklearn", "logistic_regression", {"C": 1.0}, False),
)


# Routing is sticky per entity (a hash), so the canary's observed share varies like a binomial
# over the distinct riders served: the tolerance is 4 standard deviations of that, at least 2%.
def split_tolerance(entities: int, share: float = CANARY_SHARE) -> float:
    return max(0.02, 4.0 * math.sqrt(share * (1.0 - share) / entities))


class StageResult(msgspec.Struct, kw_only=True):
    name: str
    detail: str
    ok: bool
    seconds: float = 0.0
    pending: bool = False  # skipped: a piece it needs has not landed (does not fail the run)


class VersionInfo(msgspec.Struct, kw_only=True):
    version: int
    framework: str
    estimator: str
    auc: float
    status: str  # registry status at the end of the run
    parity_max_abs_diff: float | None  # ONNX vs native on the validation rows (the worker's)
    role: str  # "champion, 90%" | "canary, 10%" | "retrained"
    job_id: str = ""
    epochs_run: int = 0  # epochs / boosting rounds (early stopping may cut them short)
    best_epoch: int = -1


class DriftInfo(msgspec.Struct, kw_only=True):
    shifted: str
    alerted: list[str]  # subjects with a firing drift alert for the champion
    feature: str = ""  # the alerted feature reported here (the shifted one when it fired)
    psi: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None


class RetrainInfo(msgspec.Struct, kw_only=True):
    trigger: str
    job_id: str
    state: str
    version: int | None = None
    auc: float | None = None
    promoted: bool = False
    serving: bool = False  # deployed to all traffic and answering predictions
    label_rows: int = 0
    shifted_label_rows: int = 0


class DemoReport(msgspec.Struct, kw_only=True):
    ok: bool
    seconds: float
    entities: int
    backend: str
    isolation: str = ""  # the PostgreSQL schema / Redis key prefix of a server-backed run
    events: int = 0
    label_rows: int = 0
    training_rows: int = 0
    stages: list[StageResult] = msgspec.field(default_factory=list)
    latency_p50_ms: float | None = None  # embedded load run
    latency_p99_ms: float | None = None
    grpc_p50_ms: float | None = None  # gRPC load run
    grpc_p99_ms: float | None = None
    canary_share: float | None = None  # observed share of the 10% variant
    split_tolerance: float | None = None
    champion: int | None = None
    challenger: int | None = None
    drift: DriftInfo | None = None
    versions: list[VersionInfo] = msgspec.field(default_factory=list)
    retrain: RetrainInfo | None = None
    #: --keep: the settings file `carrara up --config` opens the kept platform with, and a
    #: console token (roles reader, publisher, deployer, approver) for its web console.
    settings_file: str = ""
    console_token: str = ""
    labelled: int = 0  # served predictions whose outcome was published as a delayed label
    served_auc: float | None = None  # the champion's AUC on them, as monitoring judged it

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)

    @property
    def pending(self) -> list[str]:
        return [s.name for s in self.stages if s.pending]


# -- data ---------------------------------------------------------------------------------


def _definitions() -> Any:
    from carrara.feature_cache import Aggregation, Definitions, Entity, Feature, FeatureGroup

    return Definitions(
        entities=(Entity(name="rider", join_key="rider_id"),),
        groups=(
            FeatureGroup(
                name="trips",
                entity="rider",
                ttl_days=30,
                features=tuple(Feature(name=f) for f in TRIP_FEATURES),
                description="daily ride aggregates",
            ),
            FeatureGroup(
                name="payments",
                entity="rider",
                ttl_days=30,
                features=tuple(Feature(name=f) for f in PAY_FEATURES),
                description="daily payment aggregates",
            ),
            # The raw ride events, aggregated over sliding windows by every engine alike.
            FeatureGroup(
                name="ride_windows",
                entity="rider",
                tile="1h",
                aggregations=(
                    Aggregation(function="count", windows=("1d", "7d")),
                    Aggregation(function="sum", column="fare", windows=("7d",)),
                    Aggregation(function="mean", column="cancelled", windows=("7d",)),
                ),
                description="ride events over sliding windows",
            ),
        ),
    )


def _events(n: int, t0_us: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw ride and payment events of ``n`` riders over ``DAYS`` days: each rider has a ride
    rate (gamma), a fare level (log-normal, higher for riders in pricier areas), a
    cancellation propensity and a card that declines now and then (betas)."""
    activity = rng.gamma(1.8, 1.4, n)  # rides per day
    fare_mu = rng.normal(2.7, 0.35, n)  # log fare
    cancel_p = rng.beta(1.5, 12, n)
    spend_mu = fare_mu + rng.normal(0.15, 0.2, n)
    decline_p = rng.beta(0.8, 18, n)

    def expand(rate: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        counts = rng.poisson(np.repeat(rate[:, None], DAYS, axis=1)) + 1  # [n, DAYS]
        rider = np.repeat(np.repeat(np.arange(n), DAYS), counts.ravel())
        day = np.repeat(np.tile(np.arange(DAYS), n), counts.ravel())
        return rider, day

    r_rider, r_day = expand(activity)
    rides = pd.DataFrame(
        {
            "rider": r_rider,
            "day": r_day,
            "ts": t0_us + r_day * DAY_US + rng.integers(0, DAY_US, len(r_rider)),
            "fare": np.exp(rng.normal(fare_mu[r_rider], 0.45)),
            "cancelled": (rng.random(len(r_rider)) < cancel_p[r_rider]).astype(float),
        }
    )
    # Payments follow completed rides (plus top-ups); a declined card is retried.
    p_rider, p_day = expand(activity * 0.8)
    payments = pd.DataFrame(
        {
            "rider": p_rider,
            "day": p_day,
            "ts": t0_us + p_day * DAY_US + rng.integers(0, DAY_US, len(p_rider)),
            "amount": np.exp(rng.normal(spend_mu[p_rider], 0.5)),
            "declined": (rng.random(len(p_rider)) < decline_p[p_rider]).astype(float),
        }
    )
    return rides, payments


def _daily(events: pd.DataFrame, t0_us: int, aggs: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Per rider and day: the aggregates, stamped at the end of the day."""
    out = events.groupby(["rider", "day"], as_index=False, sort=False).agg(**aggs)
    out["rider_id"] = "rider-" + out["rider"].astype(str)
    out["event_timestamp"] = t0_us + (out["day"] + 1) * DAY_US - 1
    cols = ["rider_id", "event_timestamp", *aggs]
    return out[cols].astype({k: "float64" for k in aggs}).reset_index(drop=True)


#: Churn: frequent cancellations and declined cards push riders away, frequent riders stay,
#: expensive rides hurt a little. Coefficients on standardized features; the latent noise
#: (what the features do not see) keeps the best achievable AUC near 0.8.
CHURN_WEIGHTS = {
    "cancel_rate": 0.9,
    "ride_count": -0.8,
    "decline_rate": 0.6,
    "avg_fare": 0.45,
    "avg_amount": 0.1,
}
CHURN_NOISE = 1.1
CHURN_BIAS = -0.9


def _churn(
    frame: pd.DataFrame, stats: dict[str, tuple[float, float]], rng: np.random.Generator
) -> NDArray[np.int64]:
    logit = np.full(len(frame), CHURN_BIAS)
    for col, w in CHURN_WEIGHTS.items():
        mean, sd = stats[col]
        logit += w * (frame[col].to_numpy(np.float64) - mean) / sd
    logit += rng.normal(0.0, CHURN_NOISE, len(frame))
    p = 1.0 / (1.0 + np.exp(-logit))
    out: NDArray[np.int64] = (rng.random(len(frame)) < p).astype(np.int64)
    return out


def _labels(
    snapshots: pd.DataFrame, stats: dict[str, tuple[float, float]], rng: np.random.Generator
) -> pd.DataFrame:
    """Churn labels half a day after each daily snapshot, from the rider's features."""
    return pd.DataFrame(
        {
            "rider_id": snapshots["rider_id"].to_numpy(),
            "event_timestamp": snapshots["event_timestamp"].to_numpy() + DAY_US // 2,
            "churned": _churn(snapshots, stats, rng),
        }
    )


def _latest(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("event_timestamp").groupby("rider_id").tail(1).set_index("rider_id")


# -- backends -----------------------------------------------------------------------------


def _with_query(url: str, **params: str) -> str:
    from urllib.parse import urlencode

    return url + ("&" if "?" in url else "?") + urlencode(params)


@contextmanager
def _open_platform(
    backend: str, root: Path, pg_url: str, redis_url: str, *, keep: bool = False
) -> Iterator[tuple[Platform, str, str, Settings]]:
    """The platform for ``backend`` (``embedded`` or a set of ``postgres``/``redis``): with
    PostgreSQL a fresh schema (search_path), with Redis a fresh key prefix for the online
    store and the event log; both are dropped after the run unless ``keep``."""
    from carrara.config import Settings
    from carrara.errors import InvalidArgumentError
    from carrara.platform import Platform

    parts = {b.strip() for b in backend.split(",") if b.strip()}
    if parts == {"embedded"}:
        local = Settings(home=str(root), cache_ttl_seconds=30.0)
        with Platform.open(local) as p:
            yield p, "embedded (SQLite, in-process online store, local event log)", "", local
        return
    unknown = parts - set(BACKENDS)
    if unknown or not parts:
        raise InvalidArgumentError(
            f"unknown --backend {backend!r}; use 'embedded' or any of {', '.join(BACKENDS)} "
            "separated by commas (e.g. postgres,redis)"
        )
    run = f"carrara_demo_{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {"home": str(root), "cache_ttl_seconds": 30.0}
    described: list[str] = []
    if "postgres" in parts:
        _create_schema(pg_url, run)
        values["registry_url"] = _with_query(pg_url, options=f"-csearch_path={run}")
        described.append(f"PostgreSQL schema {run}")
    if "redis" in parts:
        values["online_store_url"] = _with_query(redis_url, namespace=run)
        values["event_log_url"] = _with_query(redis_url, prefix=f"{run}:events")
        described.append(f"Redis prefix {run}")
    settings = Settings(**values)
    try:
        with Platform.open(settings) as p:
            yield p, ", ".join(described), run, settings
    finally:
        if "postgres" in parts and not keep:
            _drop_schema(pg_url, run)
        if "redis" in parts and not keep:
            _drop_redis_prefix(redis_url, run)


def _keep(
    p: Platform, settings: Settings, root: Path, report: DemoReport, console: Console
) -> None:
    """Write ``{root}/carrara.toml`` (the run's settings; `carrara up --config` opens it) and
    a console token for a user who may approve and deploy, and say how to open the console."""
    from carrara.up import toml_value

    values = msgspec.structs.asdict(settings)
    defaults = msgspec.structs.asdict(type(settings)())
    lines = ["# The platform `carrara demo --keep` left in place: carrara up --config THIS_FILE"]
    for key, value in values.items():
        if key != "home" and value == defaults[key]:
            continue
        lines.append(f"{key} = {toml_value(value)}")
    settings_file = root / "carrara.toml"
    settings_file.write_text("\n".join(lines) + "\n")
    token = p.registry.tokens.create("demo-user", ["reader", "publisher", "deployer", "approver"])
    token_file = root / "console-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    report.settings_file, report.console_token = str(settings_file), token
    console.print(
        f"[bold]kept[/]: carrara up --config {settings_file}, then open "
        f"http://127.0.0.1:8080/console and log in with the token in {token_file}"
    )


def _create_schema(pg_url: str, schema: str) -> None:
    import psycopg

    from carrara.errors import UnavailableError

    try:
        with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        raise UnavailableError(
            f"cannot reach PostgreSQL at {pg_url} ({exc}); start it or pass --pg-url"
        ) from exc


def _drop_schema(pg_url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _drop_redis_prefix(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    finally:
        client.close()


# -- the run ------------------------------------------------------------------------------


def run_demo(
    entities: int = 100_000,
    *,
    path: str | Path | None = None,
    load_seconds: float = 3.0,
    rate: float = 400.0,
    train_rows: int = 20_000,
    backend: str = "embedded",
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test",
    redis_url: str = "redis://127.0.0.1:6379/0",
    console: Console | None = None,
    keep: bool = False,
) -> int:
    """Run the loop; returns a process exit code (0 when every stage's check held)."""
    report = demo_report(
        entities,
        path=path,
        load_seconds=load_seconds,
        rate=rate,
        train_rows=train_rows,
        backend=backend,
        pg_url=pg_url,
        redis_url=redis_url,
        console=console,
        keep=keep,
    )
    return 0 if report.ok else 1


def demo_report(
    entities: int = 100_000,
    *,
    path: str | Path | None = None,
    load_seconds: float = 3.0,
    rate: float = 400.0,
    train_rows: int = 20_000,
    backend: str = "embedded",
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test",
    redis_url: str = "redis://127.0.0.1:6379/0",
    console: Console | None = None,
    keep: bool = False,
) -> DemoReport:
    """Run the loop and return its numbers (printed as it goes, and as a table at the end).

    ``keep``: leave the platform in place (``path``'s files, and the PostgreSQL schema and
    Redis prefix of a server-backed run) and write ``{path}/carrara.toml`` for
    ``carrara up --config`` plus a console token, so the run can be explored in the console.
    """
    from carrara.errors import InvalidArgumentError

    if keep and path is None:
        raise InvalidArgumentError("--keep needs --path (where the kept platform's files live)")

    if entities < 100:
        raise InvalidArgumentError(f"--entities must be at least 100, got {entities}")
    if train_rows < 200:
        raise InvalidArgumentError(f"--train-rows must be at least 200, got {train_rows}")
    if load_seconds <= 0 or rate <= 0:
        raise InvalidArgumentError(
            f"--load-seconds and the rate must be > 0, got {load_seconds} and {rate}"
        )
    console = console or Console()
    demo = _Demo(entities, load_seconds, rate, train_rows, backend, console)
    # torch's ONNX export logs a benign opset-conversion warning through onnxscript's logger
    # (no handler: it would print across the progress bars); quiet it for the run only.
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="carrara-demo-") as tmp:
            root = Path(path) if path is not None else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            with _open_platform(backend, root, pg_url, redis_url, keep=keep) as (
                p,
                where,
                isolation,
                settings,
            ):
                demo.report.isolation = isolation
                demo.run(p, root, where)
                if keep:
                    _keep(p, settings, root, demo.report, console)
    finally:
        quiet.setLevel(level)
    return demo.finish()


def _plan() -> tuple[tuple[tuple[str, str, dict[str, Any], bool], ...], str]:
    """The versions to train: xgboost + pytorch when the generic worker and both trainers are
    installed, else the scikit-learn fallback (with the reason)."""
    from carrara.training import worker

    missing = [
        m for m in ("xgboost", "torch", "onnxmltools") if importlib.util.find_spec(m) is None
    ]
    if missing:
        return FALLBACK, f"xgboost/pytorch versions need {', '.join(missing)} installed"
    if not hasattr(worker, "WorkerContext"):  # the sklearn-only worker had no context
        return FALLBACK, "xgboost/pytorch versions wait for the generic worker (get_trainer)"
    return PLANNED, ""


class _Demo:
    def __init__(
        self,
        n: int,
        load_seconds: float,
        rate: float,
        train_rows: int,
        backend: str,
        console: Console,
    ) -> None:
        self.n = n
        self.load_seconds = load_seconds
        self.rate = rate
        self.train_rows = train_rows
        self.console = console
        self.started = time.perf_counter()
        self.report = DemoReport(ok=False, seconds=0.0, entities=n, backend=backend)
        self.rng = np.random.default_rng(7)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[figure]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._stage_started = time.perf_counter()
        self._task: Any = None
        self._riders: set[str] = set()  # distinct riders the embedded load runs served

    # -- progress ---------------------------------------------------------------------------

    def stage(self, description: str) -> None:
        self._stage_started = time.perf_counter()
        self.progress.update(self._task, description=description)

    def step(self, description: str) -> None:
        """Say what the current stage is doing now (the stage's clock keeps running)."""
        self.progress.update(self._task, description=description)

    def done(self, name: str, detail: str, ok: bool, *, pending: bool = False) -> bool:
        seconds = time.perf_counter() - self._stage_started
        self.report.stages.append(
            StageResult(name=name, detail=detail, ok=ok, seconds=seconds, pending=pending)
        )
        mark = "[yellow]…[/] pending" if pending else ("[green]✓[/]" if ok else "[red]✗[/]")
        self.progress.console.print(f"{mark} {name}: {detail} [dim]({seconds:.1f} s)[/]")
        self.progress.advance(self._task)
        self._stage_started = time.perf_counter()
        self.progress.update(
            self._task,
            figure=f"{len(self.report.stages)} stages, {time.perf_counter() - self.started:.0f} s",
        )
        return ok

    # -- stages -----------------------------------------------------------------------------

    def run(self, p: Platform, root: Path, where: str) -> None:
        with self.progress:
            self._task = self.progress.add_task("starting", total=12, figure="")
            self.progress.console.print(f"[bold]carrara demo[/]: {self.n:,} riders on {where}")
            try:
                self._run(p, root)
            finally:
                self.progress.update(self._task, description="done")

    def _run(self, p: Platform, root: Path) -> None:
        now_us = time.time_ns() // 1000
        t0_us = (now_us // DAY_US - DAYS - 1) * DAY_US
        r = self.report

        # 1. Events -> feature groups -> offline store -> online store.
        self.stage("features: generate, apply, ingest, materialize")
        self.step(f"features: generating events for {self.n:,} riders")
        rides, payments = _events(self.n, t0_us, self.rng)
        trips = _daily(
            rides,
            t0_us,
            {
                "ride_count": ("fare", "size"),
                "avg_fare": ("fare", "mean"),
                "cancel_rate": ("cancelled", "mean"),
            },
        )
        pays = _daily(
            payments,
            t0_us,
            {"avg_amount": ("amount", "mean"), "decline_rate": ("declined", "mean")},
        )
        r.events = len(rides) + len(payments)
        p.features.apply(_definitions())
        self.step(f"features: ingesting {len(trips) + len(pays):,} daily rows (offline store)")
        rows = p.features.ingest("trips", trips) + p.features.ingest("payments", pays)
        ride_events = pd.DataFrame(
            {
                "rider_id": "rider-" + rides["rider"].astype(str),
                "event_timestamp": rides["ts"],
                "fare": rides["fare"],
                "cancelled": rides["cancelled"],
            }
        )
        self.step(f"features: ingesting {len(ride_events):,} ride events (windowed group)")
        events_in = p.features.write_offline("ride_windows", ride_events)
        self.step(f"features: materializing {self.n:,} riders x 3 groups (online store)")
        materialized = p.features.materialize(full=True)
        # Every ride is inside the 7-day window now: the served count is the rider's rides.
        sample = [f"rider-{i}" for i in range(min(self.n, 200))]
        served = p.features.get_online("ride_windows", sample, ["event_count_7d"]).values[:, 0]
        counted = ride_events["rider_id"].value_counts().reindex(sample, fill_value=0)
        windows_ok = bool((served == counted.to_numpy()).all())
        self.done(
            "features",
            f"{r.events:,} events -> {rows:,} daily feature rows in 2 groups + "
            f"{events_in:,} ride events in 1 windowed group, "
            f"{len(materialized)} groups materialized online",
            rows == len(trips) + len(pays)
            and events_in == len(ride_events)
            and len(materialized) == 3
            and windows_ok,
        )

        # 2. Labels and a point-in-time training set (label rows subsampled).
        self.stage("labels + point-in-time training set")
        snapshots = trips.merge(pays, on=["rider_id", "event_timestamp"], how="inner")
        self.stats = {
            c: (float(snapshots[c].mean()), float(snapshots[c].std()) + 1e-9) for c in CHURN_WEIGHTS
        }
        labels = _labels(snapshots, self.stats, self.rng)
        r.label_rows = len(labels)
        # Each rider's latest outcome: the delayed labels of the traffic served in stage 7.
        self._churn = labels.sort_values("event_timestamp").groupby("rider_id")["churned"].last()
        if len(labels) > self.train_rows:
            labels = labels.sample(self.train_rows, random_state=11).reset_index(drop=True)
        r.training_rows = len(labels)
        self.label_path = root / "labels.parquet"
        labels.to_parquet(self.label_path)
        ts = p.features.get_training_set(labels, FEATURE_REFS).to_pandas()
        columns = [f.replace(":", "__") for f in FEATURE_REFS]
        filled = float(ts[columns].notna().all(axis=1).mean())
        self.done(
            "training set",
            f"{len(ts):,} of {r.label_rows:,} label rows (subsampled for training) x "
            f"{len(columns)} features, {filled:.0%} complete, {labels['churned'].mean():.0%} churn",
            len(ts) == len(labels) and filled > 0.95,
        )

        # 3. Two versions through the queue; the worker exports ONNX and checks parity.
        self.stage("training: 2 jobs through the queue")
        plan, pending = _plan()
        from carrara.registry.types import Gate

        p.registry.create_model(
            MODEL,
            actor=p.actor,
            framework=plan[0][0],
            description="demo: will a rider churn?",
            gates=[Gate(metric="auc", dataset="holdout", threshold=AUC_GATE)],
        )
        self.specs = [self._spec(fw, est, params, es) for fw, est, params, es in plan]
        jobs = [p.training.submit(s, submitted_by="carrara-demo") for s in self.specs]
        finished = self._train(p, jobs)
        versions = self._versions(p, finished)
        ok = len(versions) == 2 and all(v.parity_max_abs_diff is not None for v in versions)
        self.done(
            "training",
            ", ".join(
                f"v{v.version} {v.framework} {v.estimator} auc={v.auc:.3f} "
                + (
                    f"({v.epochs_run} epochs, best {v.best_epoch}) "
                    if v.framework == "pytorch"
                    else ""
                )
                + f"ONNX parity {v.parity_max_abs_diff:.1e}"
                for v in versions
                if v.parity_max_abs_diff is not None
            )
            or "; ".join(f"{j.model_name}: {j.error}" for j in finished),
            ok,
        )
        if pending:
            self.done("xgboost + pytorch", pending, True, pending=True)
        if not ok:
            return

        # 4. Evaluate, promote the better one through the gate.
        self.stage("registry: evaluate, gate, promote")
        for v in versions:
            p.registry.record_evaluation(MODEL, v.version, "holdout", {"auc": v.auc}, actor=p.actor)
        champ = max(versions, key=lambda v: v.auc)
        chall = next(v for v in versions if v is not champ)
        champ.role, chall.role = "champion, 90%", "canary, 10%"
        r.champion, r.challenger = champ.version, chall.version
        promoted = p.registry.promote(MODEL, champ.version, actor=p.actor)
        gates = ", ".join(
            f"{g.metric} {g.value:.3f} >= {AUC_GATE}: {'pass' if g.passed else 'FAIL'}"
            for g in promoted.gate_results
        )
        self.done(
            "promotion",
            f"v{champ.version} ({champ.framework}) -> PRODUCTION; gate {gates}",
            promoted.version.status == "PRODUCTION"
            and all(g.passed for g in promoted.gate_results),
        )

        # 5. Deploy 90/10 and check served == the native model on the latest feature rows.
        self.stage("deploy 90/10 and serve")
        from carrara.registry.types import TrafficSplit, VariantSplit

        p.deploy(
            MODEL,
            champ.version,
            TrafficSplit(
                variants=[
                    VariantSplit(
                        name="champion",
                        version=champ.version,
                        weight_bp=round(1e4 * (1 - CANARY_SHARE)),
                    ),
                    VariantSplit(
                        name="canary",
                        version=chall.version,
                        weight_bp=round(1e4 * CANARY_SHARE),
                        canary=True,
                    ),
                ],
                salt="demo",
            ),
        )
        natives = {v.version: self._native(p, v) for v in versions}
        self._pays_latest = _latest(pays).drop(columns="event_timestamp").reset_index()
        latest = _latest(trips).join(_latest(pays).drop(columns="event_timestamp"), how="inner")
        names = [c.split("__")[1] for c in columns]
        sample = [f"rider-{i}" for i in range(0, self.n, max(1, self.n // 64))]
        served = p.predict(MODEL, sample)
        x = latest.loc[sample, names].to_numpy(np.float32)
        expected = np.array([natives[v][1](x[i : i + 1])[0] for i, v in enumerate(served.versions)])
        diff = float(np.max(np.abs(served.outputs[:, 0] - expected)))
        tol = max(natives[v][2] for v in natives)
        self.done(
            "serving",
            f"{len(sample)} riders served by v{sorted(set(served.versions))}, "
            f"max |served - native| = {diff:.1e} (<= {tol:.0e})",
            diff <= tol,
        )

        # 6. Reference profile for the champion, then load runs: embedded and gRPC.
        # Drift is judged for the champion: the canary serves a tenth of the riders, a
        # sample too small and too particular to compare with the whole training population.
        from carrara.monitoring import ModelMonitorConfig

        reference = ts[columns].fillna(ts[columns].mean())
        reference.columns = names
        outputs = natives[champ.version][1](reference.to_numpy(np.float32))
        p.monitor.set_reference(
            MODEL, champ.version, reference, outputs, baseline={"auc": champ.auc}
        )
        p.monitor.configure(MODEL, ModelMonitorConfig(window_ms=WINDOW_MS, allowed_lateness_ms=0))

        self.stage("load run (embedded gateway, open loop)")
        result, counts = self._load(p, "embedded")
        total = sum(counts.values())
        canary = counts["canary"] / total if total else 0.0
        lat = result.latency
        r.latency_p50_ms, r.latency_p99_ms = lat.p50_ms, lat.p99_ms
        # Sticky routing: the share varies with the distinct riders served, not requests.
        r.canary_share, r.split_tolerance = canary, split_tolerance(max(1, len(self._riders)))
        self.done(
            "load run",
            f"embedded gateway: {result.ok:,}/{result.requests:,} requests ok at "
            f"{result.achieved_rate:.0f}/s, "
            f"p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms",
            result.requests > 0 and result.ok == result.requests,
        )
        self.done(
            "traffic split",
            f"{1 - canary:.1%} v{champ.version} / {canary:.1%} v{chall.version} over "
            f"{total:,} predictions for {len(self._riders):,} riders "
            f"(target {1 - CANARY_SHARE:.0%}/{CANARY_SHARE:.0%} ± {r.split_tolerance:.1%})",
            total > 0 and abs(canary - CANARY_SHARE) <= r.split_tolerance,
        )

        self.stage("load run (gateway gRPC on loopback, open loop)")
        import grpc

        from carrara.gateway.grpc_client import predict_stub
        from carrara.v1 import predict_pb2

        with p.serve() as server:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                response = predict_stub(ch)(
                    predict_pb2.PredictRequest(model=MODEL, entity_ids=sample), timeout=10.0
                )
            over_grpc = np.array([pr.values[0] for pr in response.predictions], np.float32)
            grpc_diff = float(np.max(np.abs(over_grpc - served.outputs[:, 0])))
            gres, _ = self._load(p, "gRPC", address=f"127.0.0.1:{server.grpc_port}")
        r.grpc_p50_ms, r.grpc_p99_ms = gres.latency.p50_ms, gres.latency.p99_ms
        self.done(
            "gRPC",
            f"gateway gRPC front: {gres.ok:,}/{gres.requests:,} requests ok at "
            f"{gres.achieved_rate:.0f}/s, "
            f"p50 {gres.latency.p50_ms:.2f} ms, p99 {gres.latency.p99_ms:.2f} ms; "
            f"max |gRPC - embedded| = {grpc_diff:.1e}",
            gres.requests > 0 and gres.ok == gres.requests and grpc_diff <= 1e-6,
        )

        # 7. Monitoring on unshifted traffic: no feature drifts; the outcomes of some served
        # predictions arrive (delayed labels) and the served AUC is judged against the
        # champion's holdout AUC.
        self.stage("monitoring: baseline")
        labelled = self._delayed_labels(p)
        before = self._firing(p, champ.version)
        false_alarms = sorted(s for s in before if s != "__prediction__")
        served_auc = self._served_auc(p, champ.version)
        r.labelled, r.served_auc = labelled, served_auc
        auc_text = f"{served_auc:.3f}" if served_auc is not None else "not judged"
        self.done(
            "monitoring (baseline)",
            ("no feature drift" if not false_alarms else f"unexpected drift on {false_alarms}")
            + f"; {labelled:,} predictions labelled later, served AUC {auc_text} "
            f"(holdout {champ.auc:.3f})",
            not false_alarms and served_auc is not None,
        )

        # 8. An alert trigger on the model, then shift one feature and expect the alert.
        self.stage("register the alert trigger")
        trigger = self._register_trigger(p, champ)
        self.stage(f"shift {SHIFTED} and monitor")
        shifted = _latest(trips).reset_index()
        sd = float(trips[SHIFTED].std())
        shifted[SHIFTED] = shifted[SHIFTED] + 3.0 * sd
        shifted["event_timestamp"] = time.time_ns() // 1000 - 1_000_000
        self.step(f"shift {SHIFTED}: ingest + materialize {len(shifted):,} shifted rows")
        p.features.ingest("trips", shifted)
        p.features.materialize("trips", full=True)
        self.step(f"shift {SHIFTED}: serving shifted traffic, then the monitor judges it")
        p.flush_predictions()  # a fresh gateway: the cache drops the old values
        self._load(p, "shifted")
        drifted = self._firing(p, champ.version)
        features_drifted = sorted(s for s in drifted if s != "__prediction__")
        r.drift = self._drift_info(p, champ.version, sorted(drifted))
        d = r.drift
        stat = (
            f"PSI {d.psi:.2f}, KS D={d.ks_statistic:.3f}, p={d.ks_pvalue:.1e}"
            if d.psi is not None and d.ks_statistic is not None and d.ks_pvalue is not None
            else "no statistics"
        )
        self.done(
            "drift alert",
            f"{SHIFTED} +3 sd -> firing on {sorted(drifted)}; {SHIFTED}: {stat}",
            features_drifted == [SHIFTED],
        )

        # 9. The alert trigger submits the retraining job; the worker runs it on labels that
        # now include the shifted period; the new version is gated and promoted if it passes.
        self.stage("retrain on the alert")
        if trigger is None:
            self.done(
                "retrain",
                "pending: training/triggers.py (alert trigger) not landed",
                True,
                pending=True,
            )
        else:
            self._retrain(p, shifted, champ, trigger)
        statuses = {v.version: v.status for v in p.registry.list_versions(MODEL)}
        for v in r.versions:
            v.status = statuses.get(v.version, v.status)

    # -- helpers ----------------------------------------------------------------------------

    def _spec(self, framework: str, estimator: str, params: dict[str, Any], early: bool) -> JobSpec:
        from carrara.training.spec import (
            CheckpointSpec,
            DatasetSpec,
            EarlyStoppingSpec,
            JobSpec,
            ModelSpec,
        )

        return JobSpec(
            model_name=MODEL,
            dataset=DatasetSpec(
                features=FEATURE_REFS,
                label_source=str(self.label_path),
                label_column="churned",
                entity_column="rider_id",
                validation_fraction=0.25,
            ),
            model=ModelSpec(framework=framework, estimator=estimator, params=params),
            early_stopping=EarlyStoppingSpec(metric="val_loss", patience=3) if early else None,
            checkpoint=CheckpointSpec(every_epochs=5, keep=1),
            seed=7,
        )

    def _train(self, p: Platform, jobs: list[Job]) -> list[Job]:
        """Run the queued jobs on an in-process worker thread; show each job's state and its
        newest log line live; returns the jobs in their final state, in submission order."""
        errors: list[BaseException] = []

        def work() -> None:
            try:
                p.training.run_pending(heartbeat_interval_s=1.0)
            except BaseException as exc:  # reported below; the thread must not die silently
                errors.append(exc)

        thread = threading.Thread(target=work, name="demo-worker", daemon=True)
        tasks = {
            j.job_id: self.progress.add_task(
                f"  job {j.job_id[:8]} {j.spec().model.framework}", total=None, figure="QUEUED"
            )
            for j in jobs
        }
        after = dict.fromkeys(tasks, 0)
        last = dict.fromkeys(tasks, "")
        thread.start()
        while True:
            alive = thread.is_alive()
            for j in jobs:
                job = p.training.get(j.job_id)
                lines = p.training.queue.logs(j.job_id, after=after[j.job_id])
                if lines:
                    after[j.job_id] = lines[-1].seq
                    last[j.job_id] = lines[-1].message[:70]
                figure = f"{job.state}: {last[j.job_id]}" if last[j.job_id] else str(job.state)
                self.progress.update(tasks[j.job_id], figure=figure)
            if not alive:
                break
            thread.join(0.25)
        for task in tasks.values():
            self.progress.remove_task(task)
        if errors:
            raise errors[0]
        return [p.training.get(j.job_id) for j in jobs]

    def _versions(self, p: Platform, jobs: list[Job]) -> list[VersionInfo]:
        out: list[VersionInfo] = []
        for job in jobs:
            if job.state != "SUCCEEDED" or not job.result:
                continue
            res = job.result
            mv = p.registry.get_version(MODEL, int(res["version"]))
            parity = res.get("parity_max_abs_diff")
            if parity is None and "training.parity" in mv.tags:  # a reused registration
                parity = json.loads(mv.tags["training.parity"]).get("max_abs_diff")
            info = VersionInfo(
                version=mv.version,
                framework=mv.framework,
                estimator=mv.tags.get("training.estimator", job.spec().model.estimator),
                auc=float(res["metrics"].get("auc", 0.0)),
                status=mv.status,
                parity_max_abs_diff=None if parity is None else float(parity),
                role="",
                job_id=job.job_id,
                epochs_run=int(res.get("epochs_run", 0)),
                best_epoch=int(res.get("best_epoch", -1)),
            )
            out.append(info)
            self.report.versions.append(info)
        return out

    def _native(
        self, p: Platform, v: VersionInfo
    ) -> tuple[Any, Callable[[NDArray[np.float32]], NDArray[np.float64]], float]:
        """The version's native model (from the registry) as a scoring function, with the
        trainer's parity tolerance for comparing it to served scores."""
        from carrara.training.frameworks import TrainData, get_trainer

        trainer = get_trainer(v.framework)
        d = len(FEATURE_REFS)
        empty = np.zeros((1, d), np.float32)
        data = TrainData(
            x_train=empty,
            y_train=np.zeros(1, np.int64),
            x_val=empty,
            y_val=np.zeros(1, np.int64),
            feature_names=[f.split(":")[1] for f in FEATURE_REFS],
            task="classification",
            classes=[0, 1],
        )
        model = trainer.load_native(p.registry.load_artifact(MODEL, v.version, "native"), data)

        def score(x: NDArray[np.float32]) -> NDArray[np.float64]:
            s = trainer.predict_scores(model, x, "classification")
            return np.asarray(s, np.float64).reshape(len(x), -1)[:, -1]

        # Served scores pass through ONNX Runtime: allow the trainer's parity tolerance.
        return model, score, trainer.parity_atol + trainer.parity_rtol

    def _load(self, p: Platform, label: str, *, address: str = "") -> tuple[Any, Counter[str]]:
        from carrara.loadgen import CallableTarget, EntitySpec, StagePlan, TargetSpec, run_stage

        counts: Counter[str] = Counter()
        task = self.progress.add_task(f"  load: {label}", total=None, figure="0 predictions")

        def call(ids: list[str]) -> None:
            res = p.predict(MODEL, ids)
            counts.update(res.variants)
            self._riders.update(ids)
            self.progress.update(
                task, advance=len(ids), figure=f"{sum(counts.values()):,} predictions"
            )

        spec = TargetSpec(
            kind="grpc" if address else "null",
            address=address,
            model=MODEL,
            batch=4,
            entities=EntitySpec(count=self.n, prefix="rider-"),
        )
        plan = StagePlan(
            mode="open", rate=self.rate, duration_s=self.load_seconds, warmup_s=0.2, seed=3
        )
        if address:
            # A network target: the harness's own gRPC client; progress by elapsed time.
            done = threading.Event()

            def tick() -> None:
                t = time.perf_counter()
                while not done.wait(0.2):
                    self.progress.update(
                        task, figure=f"~{(time.perf_counter() - t) * self.rate:,.0f} requests sent"
                    )

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
            try:
                result = run_stage(spec, plan)
            finally:
                done.set()
                ticker.join()
        else:
            result = run_stage(spec, plan, make_target=lambda: CallableTarget(call))
        self.progress.remove_task(task)
        return result, counts

    def _delayed_labels(self, p: Platform, batches: int = 3, size: int = 400) -> int:
        """Serve ``batches`` batches of riders one monitoring window apart and publish each
        prediction's outcome (the rider's latest churn label) on the ``labels`` topic, as the
        ground truth arriving after the fact would be."""
        from carrara.monitoring.traffic import publish
        from carrara.types import LabelRecord

        riders = list(self._churn.index)
        count = 0
        for b in range(batches):
            ids = [riders[(b * size + i) % len(riders)] for i in range(size)]
            served = p.predict(MODEL, ids)
            now_ms = time.time_ns() // 1_000_000
            records = [
                LabelRecord(
                    request_id=f"{served.request_id}:{i}",
                    model=MODEL,
                    label=float(self._churn[rider]),
                    timestamp_ms=now_ms,
                )
                for i, rider in enumerate(served.entity_ids)
            ]
            publish(p.events, records)
            count += len(records)
            if b < batches - 1:
                time.sleep(WINDOW_MS / 1000)  # the next batch lands in the next window
        return count

    def _served_auc(self, p: Platform, version: int) -> float | None:
        """The newest judged AUC of ``version`` on labelled traffic."""
        from carrara.monitoring.store import performance_history

        history = performance_history(p.monitor.db, MODEL, version)
        values = [v for _, metric, v, _ in history if metric == "auc"]
        return values[-1] if values else None

    def _firing(self, p: Platform, version: int) -> set[str]:
        p.monitor.run()
        return {
            a.subject for a in p.monitor.active(MODEL) if a.kind == "drift" and a.version == version
        }

    def _drift_info(self, p: Platform, version: int, alerted: list[str]) -> DriftInfo:
        from carrara.monitoring.store import drift_history

        info = DriftInfo(shifted=SHIFTED, alerted=alerted)
        worst: Any = None
        for _, fd in drift_history(p.monitor.db, MODEL, version):
            if (
                fd.feature == SHIFTED
                and fd.status == "alert"
                and (worst is None or (fd.psi or 0.0) > (worst.psi or 0.0))
            ):
                worst = fd
        if worst is not None:
            info.feature = SHIFTED
            info.psi = worst.psi
            info.ks_statistic = worst.ks_statistic
            info.ks_pvalue = worst.ks_pvalue
        return info

    # -- retraining (needs training/triggers.py) --------------------------------------------

    def _register_trigger(self, p: Platform, champ: VersionInfo) -> Any:
        """Register an ``alert`` trigger that retrains the champion's spec; None (and a
        pending stage) while ``carrara.training.triggers`` has not landed."""
        if importlib.util.find_spec("carrara.training.triggers") is None:
            self.done(
                "alert trigger", "pending: training/triggers.py not landed", True, pending=True
            )
            return None
        from carrara.training import triggers

        spec = next(s for s in self.specs if s.model.framework == champ.framework)
        runner = _trigger_runner(triggers, p, TRIGGER, spec)
        self.done(
            "alert trigger",
            f"{TRIGGER!r}: a firing drift alert on {MODEL} submits a {champ.framework} "
            f"{champ.estimator} retraining job",
            True,
        )
        return runner

    def _retrain(self, p: Platform, shifted: pd.DataFrame, champ: VersionInfo, runner: Any) -> None:
        r = self.report
        # Labels for the shifted period: riders seen after the shift, churning by the same
        # rule on their new features; appended to the label source the trigger's spec reads.
        n_new = max(100, r.training_rows // 3)
        pick = shifted.sample(min(n_new, len(shifted)), random_state=13).reset_index(drop=True)
        pick = pick.merge(self._pays_latest, on="rider_id", how="left")
        new = pd.DataFrame(
            {
                "rider_id": pick["rider_id"].to_numpy(),
                "event_timestamp": np.full(len(pick), time.time_ns() // 1000, np.int64),
                "churned": _churn(pick, self.stats, self.rng),
            }
        )
        old = pd.read_parquet(self.label_path)
        labels = pd.concat([old, new], ignore_index=True)
        labels.to_parquet(self.label_path)
        self.step("retrain: the trigger runner polls the alerts topic")
        submitted = _poll_trigger(runner, p)
        if not submitted:
            self.done("retrain", "the alert trigger submitted no job", False)
            return
        job_id = submitted[0]
        finished = self._train(p, [p.training.get(job_id)])
        job = finished[0]
        info = RetrainInfo(
            trigger=TRIGGER,
            job_id=job_id,
            state=job.state,
            label_rows=len(labels),
            shifted_label_rows=len(new),
        )
        r.retrain = info
        versions = self._versions(p, finished)
        if not versions:
            self.done("retrain", f"job {job_id[:8]} {job.state}: {job.error}", False)
            return
        v = versions[0]
        v.role = "retrained"
        info.version, info.auc = v.version, v.auc
        p.registry.record_evaluation(MODEL, v.version, "holdout", {"auc": v.auc}, actor=p.actor)
        gate_ok = v.auc >= AUC_GATE
        if gate_ok:
            promoted = p.registry.promote(MODEL, v.version, actor=p.actor)
            info.promoted = promoted.version.status == "PRODUCTION"
        if info.promoted:
            # Roll the retrained version out to all traffic and check it is what serves.
            p.deploy(MODEL, v.version)
            served = p.predict(
                MODEL, [f"rider-{i}" for i in range(0, self.n, max(1, self.n // 32))]
            )
            info.serving = sorted(set(served.versions)) == [v.version]
        self.done(
            "retrain",
            f"trigger {TRIGGER!r} -> job {job_id[:8]} ({job.state}) on {len(labels):,} labels "
            f"({len(new):,} after the shift) -> v{v.version} {v.framework} auc={v.auc:.3f}, "
            + (
                "promoted to PRODUCTION and serving 100%"
                if info.promoted and info.serving
                else "gate failed, not promoted"
                if not info.promoted
                else "promoted, but the deployment does not serve it"
            ),
            job.state == "SUCCEEDED" and gate_ok and info.promoted and info.serving,
        )

    # -- summary ----------------------------------------------------------------------------

    def finish(self) -> DemoReport:
        r = self.report
        r.seconds = time.perf_counter() - self.started
        r.ok = bool(r.stages) and all(s.ok for s in r.stages)
        table = Table(
            title="Carrara demo: features -> training -> registry -> serving -> monitoring"
            " -> retraining"
        )
        table.add_column("stage")
        table.add_column("result")
        table.add_column("s", justify="right")
        table.add_column("check", justify="center")
        for s in r.stages:
            mark = "[yellow]pending[/]" if s.pending else "[green]✓[/]" if s.ok else "[red]✗[/]"
            table.add_row(s.name, s.detail, f"{s.seconds:.1f}", mark)
        self.console.print(table)
        lines: list[str] = []
        if r.latency_p50_ms is not None:
            lines.append(
                f"latency: embedded p50 {r.latency_p50_ms:.2f} ms / p99 {r.latency_p99_ms:.2f} ms"
                + (
                    f"; gRPC p50 {r.grpc_p50_ms:.2f} ms / p99 {r.grpc_p99_ms:.2f} ms"
                    if r.grpc_p50_ms is not None
                    else ""
                )
            )
        if r.canary_share is not None and r.split_tolerance is not None:
            lines.append(
                f"split: observed {1 - r.canary_share:.1%}/{r.canary_share:.1%} vs "
                f"{1 - CANARY_SHARE:.0%}/{CANARY_SHARE:.0%} (tolerance ± {r.split_tolerance:.1%})"
            )
        if r.drift is not None:
            d = r.drift
            lines.append(
                f"drift: {d.shifted} shifted +3 sd -> alerts on {d.alerted}"
                + (
                    f"; {d.feature}: PSI {d.psi:.2f}, KS D={d.ks_statistic:.3f}, "
                    f"p-value {d.ks_pvalue:.1e}"
                    if d.psi is not None and d.ks_statistic is not None and d.ks_pvalue is not None
                    else ""
                )
            )
        for v in r.versions:
            lines.append(
                f"version v{v.version}: {v.framework} {v.estimator}, AUC {v.auc:.3f}, "
                f"{v.status} ({v.role})"
            )
        if r.retrain is not None:
            t = r.retrain
            lines.append(
                f"retrain: job {t.job_id} {t.state} -> v{t.version} "
                f"({'promoted' if t.promoted else 'not promoted'})"
            )
        if r.pending:
            lines.append(f"pending (not yet landed): {', '.join(r.pending)}")
        for line in lines:
            self.console.print(line)
        verdict = "all checks passed" if r.ok else "SOME CHECKS FAILED"
        self.console.print(
            f"demo {verdict} in {r.seconds:.1f} s ({r.entities:,} riders, "
            f"{r.training_rows:,} training label rows)"
        )
        return r


def _trigger_runner(triggers: Any, p: Platform, name: str, spec: JobSpec) -> Any:
    """Store an ``alert`` trigger that submits ``spec`` when an alert for the model fires on
    the ``alerts`` topic, and the runner that polls for it (training/triggers.py)."""
    runner = triggers.TriggerRunner(p.training.queue, events=p.events, features=p.features)
    runner.store.add(
        name, "alert", spec, model=spec.model_name, created_by=p.actor.subject, features=p.features
    )
    return runner


def _poll_trigger(runner: Any, p: Platform) -> list[str]:
    """One poll of the trigger runner; returns the ids of the jobs it submitted."""
    return [f.job_id for f in runner.poll_once() if f.outcome == "submitted" and f.job_id]
