"""``carrara.Platform``: the SDK facade over the parts (the top layer composes them; see
``docs/ARCHITECTURE.md``, "Layers").

``Platform.local(path)`` runs everything embedded in one process, on files under ``path``::

    with Platform.local("./carrara-data") as p:
        p.features.apply(definitions)
        p.features.ingest("trips", frame)
        p.features.materialize(full=True)
        job = p.training.submit(spec)
        p.training.run_pending()
        p.deploy("churn", version)
        p.predict("churn", ["rider-1", "rider-2"])

``Platform.open(settings)`` takes the backends from a :class:`carrara.config.Settings`
(PostgreSQL registry URL, ``redis://`` online store and event log, ...); ``local`` is ``open``
with every default under ``path``.

Layout of ``local``: SQLite registry + feature catalog + training queue + monitoring tables in
``{path}/registry.db``, offline store ``{path}/offline``, the in-process online store, the local
event log ``{path}/events.db`` and model artifacts ``{path}/artifacts``. Nothing here adds
behaviour of its own: each attribute is the part itself (``features``, ``registry``) or a thin
wrapper that wires parts together (``training``, ``monitor``, the embedded gateway).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from carrara.config import Settings
    from carrara.eventlog import EventLog
    from carrara.feature_cache.service import FeatureService
    from carrara.gateway.embedded import Embedded
    from carrara.gateway.engine import PredictionResult
    from carrara.gateway.server import GatewayServer
    from carrara.monitoring import Alert, ModelMonitorConfig, MonitoringConsumer
    from carrara.monitoring.alerts import ActiveAlert
    from carrara.monitoring.views import DistributionView, DriftView, PerformanceView
    from carrara.registry.auth import Principal
    from carrara.registry.registry import ModelRegistry
    from carrara.registry.types import Deployment, TrafficSplit
    from carrara.sql import Database
    from carrara.training.queue import Job, JobQueue, LogLine
    from carrara.training.spec import JobSpec

__all__ = ["Monitor", "Platform", "Training"]

#: The local actor of an embedded platform: every role, since there is one user.
LOCAL_ROLES = frozenset({"reader", "publisher", "deployer", "approver", "admin"})


class Training:
    """The durable job queue plus an in-process worker that runs what is queued."""

    def __init__(self, platform: Platform, queue: JobQueue) -> None:
        self._platform = platform
        self.queue = queue

    def submit(self, spec: JobSpec, *, submitted_by: str = "") -> Job:
        """Validate ``spec`` against the feature catalog and queue it. A relative
        ``label_source`` is made absolute against the current folder first."""
        from carrara.training.spec import with_absolute_label_source

        return self.queue.submit(
            with_absolute_label_source(spec, Path.cwd()),
            submitted_by=submitted_by or self._platform.actor.subject,
            features=self._platform.features,
        )

    def run_pending(
        self, *, heartbeat_interval_s: float = 1.0, timeout_s: float = 600.0
    ) -> builtins.list[Job]:
        """Run queued jobs in this process until the queue is empty; returns them finished.
        No job starts after ``timeout_s`` (one running then finishes first); jobs still
        queued then are a ``DeadlineExceededError``."""
        import threading

        from carrara.errors import DeadlineExceededError
        from carrara.training.worker import Worker

        worker = Worker(
            self.queue,
            features=self._platform.features,
            registry=self._platform.registry,
            actor=self._platform.actor,
            heartbeat_interval_s=heartbeat_interval_s,
        )
        stop = threading.Event()
        timer = threading.Timer(timeout_s, stop.set)
        timer.daemon = True
        timer.start()
        try:
            finished = worker.run(until_idle=True, stop=stop)
        finally:
            timer.cancel()
        if stop.is_set() and self.queue.list(state="QUEUED", limit=1):
            raise DeadlineExceededError(
                f"jobs are still queued after {timeout_s:.0f} s ({len(finished)} finished); "
                "call run_pending again or give it a longer timeout_s"
            )
        return finished

    def get(self, job_id: str) -> Job:
        return self.queue.get(job_id)

    def list(self, *, state: str | None = None, limit: int = 100) -> builtins.list[Job]:
        """Jobs, newest first, optionally in one ``state``."""
        return self.queue.list(state=state, limit=limit)

    def cancel(self, job_id: str) -> Job:
        return self.queue.cancel(job_id)

    def logs(self, job_id: str, after: int = 0) -> builtins.list[LogLine]:
        """The job's log lines after line number ``after``."""
        return self.queue.logs(job_id, after)

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> Job:
        """The job once it is SUCCEEDED, FAILED or CANCELLED: queued jobs run in this process
        (as :meth:`run_pending`); one another worker runs is polled (DeadlineExceededError
        past ``timeout_s``)."""
        import time

        from carrara.errors import DeadlineExceededError
        from carrara.training.queue import TERMINAL

        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.state in TERMINAL:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(
                    f"job {job_id} is still {job.state} after {timeout_s:.0f} s; "
                    "is another worker holding it?"
                )
            # A queued job runs here; one no worker here can take (or another holds) is polled.
            if job.state != "QUEUED" or not self.run_pending(timeout_s=left):
                time.sleep(poll_s)


class Monitor:
    """Monitoring for this platform: reference profiles, per-model config, and a consumer
    over the platform's prediction log that reports drift and performance alerts (also
    published on the event log's ``alerts`` topic)."""

    def __init__(self, platform: Platform, db: Database) -> None:
        self._platform = platform
        self.db = db
        self.alerts: list[Alert] = []
        self._consumer: MonitoringConsumer | None = None

    @property
    def consumer(self) -> MonitoringConsumer:
        """The consumer over the platform's prediction log (created on first use)."""
        if self._consumer is None:
            from carrara.monitoring import MonitoringConsumer
            from carrara.monitoring.alerts import EventLogSink

            # Alert transitions also go to the event log's ``alerts`` topic, where training
            # triggers (kind ``alert``) and other subscribers read them.
            self._consumer = MonitoringConsumer(
                self.db,
                self._platform.events,
                group="platform-monitor",
                sinks=[EventLogSink(self._platform.events)],
            )
        return self._consumer

    def configure(self, model: str, config: ModelMonitorConfig) -> None:
        from carrara.monitoring import configure_model

        self.consumer  # noqa: B018 - creates the monitoring tables
        configure_model(self.db, model, config)

    def set_reference(
        self,
        model: str,
        version: int,
        frame: Any,
        outputs: ArrayLike | None = None,
        *,
        baseline: Mapping[str, float] | None = None,
    ) -> None:
        """Store the reference profile of a version (its training features and outputs)."""
        from carrara.monitoring import build_profile, store_profile

        self.consumer  # noqa: B018 - creates the monitoring tables
        store_profile(
            self.db,
            build_profile(frame, outputs, model=model, version=version, baseline=baseline),
        )

    def run(self, *, flush: bool = True) -> list[Alert]:
        """Flush the gateway's prediction log, consume everything logged so far and judge
        the windows (every stored one when ``flush``); returns the alert transitions."""
        self._platform.flush_predictions()
        result = self.consumer.run(stop_when_idle=True, block_ms=0)
        alerts = list(result.alerts)
        if flush:
            alerts.extend(self.consumer.judge(flush=True))
        self.alerts.extend(alerts)
        return alerts

    def active(self, model: str | None = None) -> list[Alert]:
        from carrara.monitoring import active_alerts

        return active_alerts(self.db, model)

    def report(self, model: str, version: int | None = None) -> str:
        """The self-contained HTML report of ``model``."""
        from carrara.monitoring.report import render_report

        self.consumer  # noqa: B018 - creates the monitoring tables
        return render_report(self.db, model, version)

    def drift(self, model: str, version: int | None = None, *, last: int = 200) -> DriftView:
        """PSI, KS and JS per feature of the ``last`` newest judged windows (``version``:
        default the newest with windows), with the drift thresholds."""
        from carrara.monitoring.views import drift_view

        self.consumer  # noqa: B018 - creates the monitoring tables
        return drift_view(self.db, model, version, last=last)

    def distributions(self, model: str, version: int | None = None) -> DistributionView:
        """Reference vs current shares per bin of every profiled feature, newest window."""
        from carrara.monitoring.views import distribution_view

        self.consumer  # noqa: B018 - creates the monitoring tables
        return distribution_view(self.db, model, version)

    def performance(
        self, model: str, version: int | None = None, *, last: int = 200
    ) -> PerformanceView:
        """Each metric per window on labelled predictions, with the baseline and threshold."""
        from carrara.monitoring.views import performance_view

        self.consumer  # noqa: B018 - creates the monitoring tables
        return performance_view(self.db, model, version, last=last)

    def acknowledge(self, key: str, comment: str = "") -> ActiveAlert:
        """Acknowledge the firing alert ``key`` (``model:vN:kind:subject``) as the platform's
        actor (role deployer)."""
        from carrara.auth import require_role
        from carrara.monitoring.alerts import acknowledge_alert

        actor = require_role(self._platform.actor, "deployer", "acknowledging an alert")
        self.consumer  # noqa: B018 - creates the monitoring tables
        return acknowledge_alert(self.db, key, actor.subject, comment)


class Platform:
    """Features, training, registry, serving and monitoring behind one object."""

    def __init__(
        self,
        *,
        features: FeatureService,
        registry: ModelRegistry,
        queue: JobQueue,
        events: EventLog,
        db: Database,
        actor: Principal,
        cache_ttl_seconds: float = 30.0,
    ) -> None:
        self.features = features
        self.registry = registry
        self.events = events
        self.actor = actor
        self.training = Training(self, queue)
        self.monitor = Monitor(self, db)
        self._db = db
        self._cache_ttl_seconds = cache_ttl_seconds
        self._gateway: Embedded | None = None
        self._served: set[str] = set()

    @classmethod
    def local(
        cls,
        path: str | Path,
        *,
        actor: Principal | None = None,
        cache_ttl_seconds: float = 30.0,
    ) -> Platform:
        """Open (creating it if needed) an embedded platform under ``path``."""
        from carrara.config import Settings

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        return cls.open(Settings(home=str(root), cache_ttl_seconds=cache_ttl_seconds), actor=actor)

    @classmethod
    def open(cls, settings: Settings, *, actor: Principal | None = None) -> Platform:
        """Open a platform on the backends ``settings`` names: the registry URL (SQLite or
        PostgreSQL) holds registry, feature catalog, training queue and monitoring; the online
        store (``memory://`` or ``redis://...?namespace=``) and the event log (``local:///``
        or ``redis://...?prefix=``) by their URLs; offline store and artifacts on disk.
        ``Platform.local(path)`` is this with every default under ``path``."""
        from carrara.eventlog import open_event_log
        from carrara.feature_cache.service import FeatureService
        from carrara.registry.auth import Principal
        from carrara.registry.registry import ModelRegistry
        from carrara.sql import connect
        from carrara.training.queue import JobQueue

        url = settings.resolved_registry_url
        opened: list[Any] = []
        try:
            events = open_event_log(settings.resolved_event_log_url)
            opened.append(events)
            features = FeatureService.open(
                catalog_url=url,
                offline_path=settings.resolved_offline_store_path,
                online_url=settings.online_store_url,
                offline_engine=settings.offline_engine,
            )
            features.offline.configure(settings)  # the engine's own settings (Spark's master)
            # The platform's one event log, shared so features.publish and the stream
            # materializer write where every other part reads (closing it twice is harmless).
            features.event_log = events
            opened.append(features)
            registry = ModelRegistry.open(url, settings.resolved_artifact_path, events=events)
            opened.append(registry)
            queue = JobQueue.open(url, events=events)
            opened.append(queue)
            db = connect(url)
            opened.append(db)
            return cls(
                features=features,
                registry=registry,
                queue=queue,
                events=events,
                db=db,
                actor=actor or Principal("local", LOCAL_ROLES),
                cache_ttl_seconds=settings.cache_ttl_seconds,
            )
        except BaseException:
            for part in reversed(opened):
                part.close()
            raise

    # -- serving ----------------------------------------------------------------------------

    def _embedded(self) -> Embedded:
        if self._gateway is None:
            from carrara.gateway.embedded import Embedded

            self._gateway = Embedded(
                self.features.online,
                event_log=self.events,
                cache_ttl_seconds=self._cache_ttl_seconds,
            )
        return self._gateway

    def _load(self, model: str) -> None:
        from carrara.gateway.registry_source import load_active

        if load_active(self.registry, self._embedded().engine, [model]):
            self._served.add(model)
        else:
            self._served.discard(model)

    def deploy(self, model: str, version: int, split: TrafficSplit | None = None) -> Deployment:
        """Make ``split`` (default: all traffic to ``version``) the model's active deployment
        in the registry; the embedded gateway loads it at once."""
        from carrara.gateway.registry_source import build_deployment, registry_loader

        built: list[Any] = []

        def prepare(d: Deployment) -> None:
            # Load before the commit: a deployment the gateway cannot serve is never recorded.
            built.append(build_deployment(registry_loader(self.registry), d))

        try:
            deployment = self.registry.deploy(
                model, version, split, actor=self.actor, prepare=prepare
            )
        except BaseException:
            for _, backends in built:
                for b in backends.values():
                    b.close()
            raise
        self._embedded().engine.deploy(*built[0])
        self._served.add(model)
        return deployment

    def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Mapping[str, Any] | None = None,
    ) -> PredictionResult:
        """Predictions through the embedded gateway (the model's active deployment)."""
        if model not in self._served:
            self._load(model)
        return self._embedded().predict(model, entity_ids, overrides)

    @contextmanager
    def serve(self, *, grpc_port: int = 0, http_port: int = 0) -> Iterator[GatewayServer]:
        """The gateway's gRPC and HTTP fronts on loopback, over the embedded engine (port 0
        picks a free port; ``server.grpc_port`` says which), serving every model with an
        active deployment in the registry. Stopped on exit."""
        from carrara.gateway.server import GatewayServer, ServerThread
        from carrara.gateway.service import Gateway

        for m in self.registry.list_models():
            if m.name not in self._served:
                self._load(m.name)
        gateway = Gateway(self._embedded().engine)
        thread = ServerThread(
            lambda: GatewayServer(gateway, grpc_port=grpc_port, http_port=http_port)
        )
        try:
            server = thread.start()
        except BaseException:
            gateway.close()
            self.flush_predictions()
            raise
        try:
            yield server
        finally:
            thread.stop()
            # Gateway.close also closes the engine: start a fresh embedded gateway after it.
            gateway.close()
            self.flush_predictions()

    def flush_predictions(self) -> None:
        """Write every logged prediction to the event log and start a fresh embedded gateway
        (same deployments, empty feature cache, so new online values are read)."""
        # The prediction logger flushes only on close; restarting the embedded gateway is
        # the cheap way to get there (ONNX sessions reload in milliseconds).
        if self._gateway is None:
            return
        self._gateway.close()
        self._gateway = None
        served, self._served = sorted(self._served), set()
        for model in served:
            self._load(model)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving (flushing the prediction log) and close every store."""
        first: BaseException | None = None
        closers = [
            self._gateway.close if self._gateway is not None else None,
            self.training.queue.close,
            self.registry.close,
            self.features.close,
            self._db.close,
            self.events.close,
        ]
        self._gateway = None
        for close in closers:
            if close is None:
                continue
            try:
                close()
            except BaseException as exc:  # close the rest, then raise the first failure
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
