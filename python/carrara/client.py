"""``carrara.Client(url, token)``: the remote twin of ``carrara.Platform.local``.

The same attributes and methods as ``Platform`` (``features``, ``training``, ``registry``,
``monitor``, ``deploy``, ``predict``), over the control-plane API that ``carrara up`` serves
(``carrara.services``) and the serving gateway::

    with Client("http://127.0.0.1:8080", token, gateway="grpc://127.0.0.1:8001") as c:
        c.features.apply(definitions)
        c.features.ingest("trips", frame)
        c.features.materialize(full=True)
        job = c.training.wait(c.training.submit(spec).job_id)
        c.deploy("churn", job.result["version"])
        c.predict("churn", ["rider-1", "rider-2"])

Every method takes exactly the arguments of its embedded twin
(``tests/unit/test_sdk_signatures.py`` compares the signatures). Differences, by necessity:
registry methods accept ``actor=`` and do not send it (the bearer token is who acts;
``Client.actor`` is a stand-in so ``actor=c.actor`` reads as it does on a Platform); what
only makes sense in the process that holds the stores raises ``FailedPreconditionError``
(``serve``, ``features.transform_rows``, ``features.stream_materializer``,
``registry.deploy(prepare=...)``). All of it goes through one
:class:`~carrara.transport.Transport`, whose reverse error map raises the server's classes.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import msgspec
import numpy as np

from carrara import errors
from carrara.registry.client import TOKEN_ACTOR, RegistryClient
from carrara.transport import Transport, raise_for_error

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]
    from numpy.typing import ArrayLike

    from carrara.feature_cache.catalog import Change, RegisteredGroup
    from carrara.feature_cache.definitions import Definitions
    from carrara.feature_cache.materialize import MaterializeResult
    from carrara.feature_cache.offline_store import CompactionResult
    from carrara.feature_cache.pit_join import TrainingSet
    from carrara.feature_cache.service import GroupFreshness, OnlineFeatures
    from carrara.feature_cache.streaming import StreamingMaterializer
    from carrara.gateway.engine import PredictionResult
    from carrara.gateway.server import GatewayServer
    from carrara.monitoring import Alert, ModelMonitorConfig
    from carrara.monitoring.alerts import ActiveAlert
    from carrara.monitoring.views import DistributionView, DriftView, PerformanceView
    from carrara.registry.auth import Principal
    from carrara.registry.types import Deployment, TrafficSplit
    from carrara.training.queue import Job, LogLine
    from carrara.training.spec import JobSpec

__all__ = ["Client", "RemoteFeatures", "RemoteMonitor", "RemoteRegistry", "RemoteTraining"]

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def _not_remote(what: str, instead: str) -> errors.FailedPreconditionError:
    return errors.FailedPreconditionError(f"{what} runs only in-process; {instead}")


# -- features -------------------------------------------------------------------------------


class RemoteFeatures:
    """``Platform.features`` (a ``FeatureService``) over the feature API."""

    def __init__(self, http: Transport) -> None:
        self._http = http

    def _call(self, method: str, path: str, kind: Any, **kw: Any) -> Any:
        return self._http.call(method, path, kind, service="feature API", **kw)

    def apply(self, definitions: Definitions, *, dry_run: bool = False) -> list[Change]:
        from carrara.feature_cache.catalog import Change

        return self._call(  # type: ignore[no-any-return]
            "POST",
            "/features/apply",
            list[Change],
            json=definitions,
            params={"dry_run": "true" if dry_run else None},
        )

    def group(self, name: str, version: int | None = None) -> RegisteredGroup:
        from carrara.feature_cache.catalog import RegisteredGroup

        return self._call(  # type: ignore[no-any-return]
            "GET",
            f"/features/groups/{name}/definition",
            RegisteredGroup,
            params={"version": version},
        )

    def list_groups(self) -> list[RegisteredGroup]:
        from carrara.feature_cache.api import GroupSummary

        summaries = self._call("GET", "/features/groups", list[GroupSummary])
        return [self.group(s.name, s.version) for s in summaries]

    def _send_rows(self, path: str, data: Any, version: int | None) -> int:
        from carrara.feature_cache.api_admin import ARROW_STREAM, RowsWritten, arrow_to_ipc

        params = {"version": version}
        if isinstance(data, list):
            rows: RowsWritten = self._call("POST", path, RowsWritten, json=data, params=params)
        else:
            from carrara.feature_cache.offline_store import to_arrow

            rows = self._call(
                "POST",
                path,
                RowsWritten,
                content=arrow_to_ipc(to_arrow(data)),
                headers={"content-type": ARROW_STREAM},
                params=params,
            )
        return rows.rows

    def ingest(self, group: str, data: Any, *, version: int | None = None) -> int:
        """Source rows (pandas/Polars/Arrow, or a list of dicts) -> the group's transform on
        the server -> offline store; returns rows written."""
        return self._send_rows(f"/features/groups/{group}/ingest", data, version)

    def write_offline(self, group: str, data: Any, *, version: int | None = None) -> int:
        return self._send_rows(f"/features/groups/{group}/write-offline", data, version)

    def compact(self, group: str, *, version: int | None = None) -> CompactionResult:
        from carrara.feature_cache.offline_store import CompactionResult

        return self._call(  # type: ignore[no-any-return]
            "POST",
            f"/features/groups/{group}/compact",
            CompactionResult,
            params={"version": version},
        )

    def get_training_set(
        self,
        entity_df: Any,
        features: Sequence[str],
        *,
        timestamp_column: str = "event_timestamp",
        versions: dict[str, int] | None = None,
        threads: int | None = None,
    ) -> TrainingSet:
        """The point-in-time join, computed by the server (``threads`` is the server's)."""
        from carrara.feature_cache.api_admin import (
            TrainingSetRequest,
            TrainingSetResponse,
            arrow_from_ipc,
            arrow_to_ipc,
        )
        from carrara.feature_cache.offline_store import to_arrow
        from carrara.feature_cache.pit_join import TrainingSet

        body = TrainingSetRequest(
            entity_df=arrow_to_ipc(to_arrow(entity_df)),
            features=list(features),
            timestamp_column=timestamp_column,
            versions=versions,
        )
        out: TrainingSetResponse = self._call(
            "POST", "/features/training-set", TrainingSetResponse, json=body
        )
        return TrainingSet(arrow_from_ipc(out.table), out.snapshot_ref, out.spec)

    def get_online(
        self,
        group: str,
        entity_ids: Sequence[str | int],
        features: Sequence[str] | None = None,
        *,
        version: int | None = None,
        require_found: bool = False,
    ) -> OnlineFeatures:
        from carrara.feature_cache.service import OnlineFeatures, entity_id_strings

        if isinstance(entity_ids, str):
            raise errors.InvalidArgumentError("entity_ids must be a list of ids, not one string")
        body = {
            "entity_ids": entity_id_strings(entity_ids),  # integers -> their text, as locally
            "features": None if features is None else list(features),
            "version": version,
            "require_found": require_found,
        }
        from carrara.feature_cache.api import GetOnlineResponse

        r: GetOnlineResponse = self._call(
            "POST", f"/features/groups/{group}/get-online", GetOnlineResponse, json=body
        )
        d = len(r.features)
        raw = np.array(
            [[np.nan if v is None else v for v in e.values] for e in r.results], dtype=np.float64
        ).reshape(len(r.results), d)
        missing = np.isnan(raw)
        values = np.where(missing, 0.0, raw).astype(np.float32)
        found = np.array([e.found for e in r.results], dtype=np.bool_)
        return OnlineFeatures(
            r.group, r.version, [e.entity_id for e in r.results], r.features, values, missing, found
        )

    def freshness(self) -> list[GroupFreshness]:
        """Online freshness of every group, as the server's online store records it."""
        from carrara.feature_cache.service import GroupFreshness

        return self._call(  # type: ignore[no-any-return]
            "GET", "/features/freshness", list[GroupFreshness]
        )

    def materialize(
        self,
        group: str | None = None,
        *,
        full: bool = False,
        progress: bool = False,
        overlap_s: float = 60.0,
    ) -> list[MaterializeResult]:
        """Batch offline -> online on the server (``progress`` is not shown remotely)."""
        from carrara.feature_cache.api_admin import MaterializeRequest
        from carrara.feature_cache.materialize import MaterializeResult

        body = MaterializeRequest(group=group, full=full, overlap_s=overlap_s)
        return self._call(  # type: ignore[no-any-return]
            "POST", "/features/materialize", list[MaterializeResult], json=body
        )

    def publish(self, group: str, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Send source rows for ``group`` to the ``feature-updates`` topic."""
        from carrara.feature_cache.api_admin import PublishedIds

        path = f"/features/groups/{group}/publish"
        out: PublishedIds = self._call("POST", path, PublishedIds, json=list(rows))
        return out.ids

    def transform_rows(self, group: RegisteredGroup, data: Any) -> pa.Table:
        """Not remote: transforms run where the feature service runs; use :meth:`ingest`."""
        raise _not_remote("transform_rows", "ingest() sends rows through the server's transform")

    def stream_materializer(
        self, *, consumer_group: str = "feature-materializer", consumer: str | None = None
    ) -> StreamingMaterializer:
        """Not remote: the streaming materializer is a service; ``carrara up`` runs it."""
        raise _not_remote("stream_materializer", "publish() rows to the feature-updates topic")

    def close(self) -> None:
        """Nothing to close of its own (the ``Client`` owns the connection)."""


# -- registry -------------------------------------------------------------------------------


#: ``Platform.registry`` remotely: the registry client, ``ModelRegistry``'s signatures.
RemoteRegistry = RegistryClient


# -- training -------------------------------------------------------------------------------


def _job(raw: dict[str, Any]) -> Job:
    """A ``Job`` from the training API's JSON (``spec`` as an object or ``spec_json``)."""
    from carrara.training.queue import Job

    data = dict(raw)
    if "spec_json" not in data:
        data["spec_json"] = msgspec.json.encode(data.get("spec", {})).decode()
    data.pop("spec", None)
    fields = {f.name for f in msgspec.structs.fields(Job)}
    defaults: dict[str, Any] = {
        "submitted_by": "",
        "submitted_at_us": 0,
        "started_at_us": None,
        "finished_at_us": None,
        "heartbeat_at_us": None,
        "worker": None,
        "attempts": 0,
        "cancel_requested": False,
        "error": "",
        "result": {},
    }
    values = {**defaults, **{k: v for k, v in data.items() if k in fields}}
    return msgspec.convert(values, Job)


class RemoteTraining:
    """``Platform.training`` over the training API; the workers of ``carrara up`` run jobs."""

    def __init__(self, http: Transport) -> None:
        self._http = http

    def _call(self, method: str, path: str, kind: Any, **kw: Any) -> Any:
        return self._http.call(method, path, kind, service="training API", **kw)

    def submit(self, spec: JobSpec, *, submitted_by: str = "") -> Job:
        """Validate ``spec`` on the server (against its feature catalog) and queue it. A
        relative ``label_source`` is made absolute against the current folder first (the
        services must see that path: the same machine, or storage they share)."""
        from carrara.training.spec import with_absolute_label_source

        spec = with_absolute_label_source(spec, Path.cwd())
        raw = self._call(
            "POST",
            "/training-jobs",
            dict[str, Any],
            json={"spec": msgspec.to_builtins(spec), "submitted_by": submitted_by},
        )
        return _job(raw)

    def get(self, job_id: str) -> Job:
        return _job(self._call("GET", f"/training-jobs/{job_id}", dict[str, Any]))

    def list(self, *, state: str | None = None, limit: int = 100) -> builtins.list[Job]:
        from carrara.training.api import JobList

        out: JobList = self._call(
            "GET", "/training-jobs", JobList, params={"state": state, "limit": limit}
        )
        return [_job(msgspec.to_builtins(j)) for j in out.jobs]

    def cancel(self, job_id: str) -> Job:
        return _job(self._call("POST", f"/training-jobs/{job_id}/cancel", dict[str, Any]))

    def logs(self, job_id: str, after: int = 0) -> builtins.list[LogLine]:
        from carrara.training.api import LogLines

        out: LogLines = self._call(
            "GET", f"/training-jobs/{job_id}/logs", LogLines, params={"after": after}
        )
        return out.lines

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> Job:
        """The job once it is SUCCEEDED, FAILED or CANCELLED (DeadlineExceededError past
        ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.state in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise errors.DeadlineExceededError(
                    f"job {job_id} is still {job.state} after {timeout_s:.0f} s; "
                    "check the workers (carrara up logs) or wait longer"
                )
            time.sleep(poll_s)

    def run_pending(
        self, *, heartbeat_interval_s: float = 1.0, timeout_s: float = 600.0
    ) -> builtins.list[Job]:
        """Wait until the service's workers have finished every queued and running job;
        returns those jobs finished (the embedded platform runs them in-process instead).
        ``heartbeat_interval_s`` is the workers' own setting and is ignored here."""
        waiting = [j for s in ("QUEUED", "RUNNING") for j in self.list(state=s, limit=10_000)]
        deadline = time.monotonic() + timeout_s
        return [
            self.wait(j.job_id, timeout_s=max(0.0, deadline - time.monotonic())) for j in waiting
        ]


# -- monitoring -----------------------------------------------------------------------------


#: The gateway writes its prediction log every 50 ms: this long is that plus a margin.
GATEWAY_LOG_FLUSH_S = 0.2


class RemoteMonitor:
    """``Platform.monitor`` over the monitoring API; ``carrara up`` runs the consumer."""

    def __init__(self, http: Transport) -> None:
        self._http = http
        self.alerts: list[Alert] = []

    def _call(self, method: str, path: str, kind: Any, **kw: Any) -> Any:
        return self._http.call(method, path, kind, service="monitoring API", **kw)

    def configure(self, model: str, config: ModelMonitorConfig) -> None:
        from carrara.monitoring import ModelMonitorConfig

        self._call("PUT", f"/monitoring/models/{model}/config", ModelMonitorConfig, json=config)

    def set_reference(
        self,
        model: str,
        version: int,
        frame: Any,
        outputs: ArrayLike | None = None,
        *,
        baseline: Mapping[str, float] | None = None,
    ) -> None:
        """Profile ``frame`` (and ``outputs``) here and store the profile on the server."""
        from carrara.monitoring import build_profile

        profile = build_profile(frame, outputs, model=model, version=version, baseline=baseline)
        self._call(
            "PUT",
            f"/monitoring/models/{model}/versions/{version}/reference",
            None,
            content=msgspec.msgpack.encode(profile),
            headers={"content-type": "application/msgpack"},
        )

    def run(self, *, flush: bool = True) -> list[Alert]:
        """Have the server consume what the gateways logged and judge the windows (every
        stored one when ``flush``, after the gateways' prediction logs have been written);
        returns the alert transitions."""
        from carrara.monitoring.api import MonitorRun

        if flush:
            time.sleep(GATEWAY_LOG_FLUSH_S)  # what was predicted so far is on the event log

        out: MonitorRun = self._call(
            "POST", "/monitoring/run", MonitorRun, params={"flush": "true" if flush else "false"}
        )
        self.alerts.extend(out.alerts)
        return list(out.alerts)

    def active(self, model: str | None = None) -> list[Alert]:
        from carrara.monitoring.api import AlertList

        out: AlertList = self._call("GET", "/monitoring/alerts", AlertList, params={"model": model})
        return list(out.alerts)

    def report(self, model: str, version: int | None = None) -> str:
        """The self-contained HTML report of ``model``."""
        html: str = self._call(
            "GET", f"/monitoring/models/{model}/report", str, params={"version": version}
        )
        return html

    def drift(self, model: str, version: int | None = None, *, last: int = 200) -> DriftView:
        """PSI, KS and JS per feature of the ``last`` newest judged windows (``version``:
        default the newest with windows), with the drift thresholds."""
        from carrara.monitoring.views import DriftView

        params = {"version": version, "limit": last}
        out: DriftView = self._call(
            "GET", f"/monitoring/models/{quote(model, safe='')}/drift", DriftView, params=params
        )
        return out

    def distributions(self, model: str, version: int | None = None) -> DistributionView:
        """Reference vs current shares per bin of every profiled feature, newest window."""
        from carrara.monitoring.views import DistributionView

        path = f"/monitoring/models/{quote(model, safe='')}/distributions"
        out: DistributionView = self._call(
            "GET", path, DistributionView, params={"version": version}
        )
        return out

    def performance(
        self, model: str, version: int | None = None, *, last: int = 200
    ) -> PerformanceView:
        """Each metric per window on labelled predictions, with the baseline and threshold."""
        from carrara.monitoring.views import PerformanceView

        path = f"/monitoring/models/{quote(model, safe='')}/performance"
        out: PerformanceView = self._call(
            "GET", path, PerformanceView, params={"version": version, "limit": last}
        )
        return out

    def acknowledge(self, key: str, comment: str = "") -> ActiveAlert:
        """Acknowledge the firing alert ``key`` (``model:vN:kind:subject``) as the token's
        subject (role deployer)."""
        from carrara.monitoring.alerts import ActiveAlert

        out: ActiveAlert = self._call(
            "POST",
            "/monitoring/alerts/acknowledge",
            ActiveAlert,
            json={"key": key, "comment": comment},
        )
        return out


# -- the client -----------------------------------------------------------------------------


def _floats(value: Any) -> list[float]:
    """An override: one number (for every entity) or one per entity."""
    return [float(x) for x in np.ravel(np.asarray(value, dtype=np.float64))]


class Client:
    """Features, training, registry, serving and monitoring of a running Carrara.

    ``url`` is the control-plane API (``carrara up`` prints it), ``token`` a bearer token
    (``Settings.api_token`` or one from ``carrara models token create``). ``gateway`` is the
    serving gateway, ``grpc://host:port`` (its gRPC front) or ``http://host:port``; without it
    ``predict`` is unavailable and ``deploy`` does not wait for the gateway.

    A gateway with auth on (``Settings.gateway_token`` / ``gateway_tls_cert``) wants
    ``gateway_token`` (sent as ``authorization: Bearer ...``) and, with TLS, a
    ``grpcs://`` or ``https://`` address; ``gateway_tls_ca`` is the PEM file of the
    certificate(s) to trust for it (default: the system's roots). ``deploy_wait_s`` bounds
    how long :meth:`deploy` waits for the gateway to serve what was deployed (0: no wait).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        gateway: str | None = None,
        gateway_token: str | None = None,
        gateway_tls_ca: str | None = None,
        timeout_s: float = 60.0,
        deploy_wait_s: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.gateway = gateway.rstrip("/") if gateway else None
        self._gateway_token = gateway_token or None
        self._gateway_tls_ca = gateway_tls_ca or None
        self.timeout_s = timeout_s
        self.deploy_wait_s = deploy_wait_s
        self._http = Transport(url, token, timeout_s=timeout_s, http=http)
        self.features = RemoteFeatures(self._http)
        self.registry = RemoteRegistry(transport=self._http)
        #: A stand-in, so ``actor=client.actor`` (as written for ``Platform``) works: the
        #: bearer token is who acts, and the registry API checks its roles.
        self.actor: Principal = TOKEN_ACTOR
        self.training = RemoteTraining(self._http)
        self.monitor = RemoteMonitor(self._http)
        self._gateway_http: httpx.Client | None = None
        self._channel: Any = None

    # -- serving ----------------------------------------------------------------------------

    def _need_gateway(self) -> str:
        if not self.gateway:
            raise errors.FailedPreconditionError(
                "this Client has no gateway: pass gateway='grpc://host:port' (or http://...), "
                "as `carrara up` prints it"
            )
        return self.gateway

    def _is_grpc(self) -> bool:
        return self._need_gateway().startswith(("grpc://", "grpcs://"))

    def _grpc(self) -> Any:
        if self._channel is None:
            from carrara.gateway.grpc_client import open_channel

            self._channel = open_channel(
                self._need_gateway(), root_certificates=self._gateway_tls_ca
            )
        return self._channel

    def _grpc_metadata(self) -> Any:
        from carrara.gateway.grpc_client import bearer_metadata

        return bearer_metadata(self._gateway_token)

    def _gw_http(self) -> httpx.Client:
        if self._gateway_http is None:
            import ssl

            self._gateway_http = httpx.Client(
                base_url=self._need_gateway(),
                timeout=self.timeout_s,
                headers={"authorization": f"Bearer {self._gateway_token}"}
                if self._gateway_token
                else None,
                verify=ssl.create_default_context(cafile=self._gateway_tls_ca)
                if self._gateway_tls_ca
                else True,
            )
        return self._gateway_http

    def _served_versions(self, model: str) -> set[int] | None:
        """The versions the gateway serves for ``model`` (None: not deployed there), from its
        KServe model metadata on either front."""
        if self._is_grpc():
            import grpc
            from tritonclient.grpc import service_pb2 as kserve
            from tritonclient.grpc import service_pb2_grpc as kserve_grpc

            stub = kserve_grpc.GRPCInferenceServiceStub(self._grpc())
            try:
                meta = stub.ModelMetadata(
                    kserve.ModelMetadataRequest(name=model),
                    timeout=5.0,
                    metadata=self._grpc_metadata(),
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise errors.UnavailableError(
                    f"gateway {self.gateway}: {exc.code().name}: {exc.details()}"
                ) from exc
            return {int(v) for v in meta.versions}
        try:
            r = self._gw_http().get(f"/v2/models/{quote(model, safe='')}")
        except httpx.HTTPError as exc:
            raise errors.UnavailableError(f"gateway {self.gateway} unreachable: {exc}") from exc
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise errors.UnavailableError(
                f"gateway {self.gateway}: HTTP {r.status_code} for model metadata: {r.text[:200]}"
            )
        return {int(v) for v in r.json().get("versions", [])}

    def deploy(
        self,
        model: str,
        version: int,
        split: TrafficSplit | None = None,
    ) -> Deployment:
        """Make ``split`` (default: all traffic to ``version``) the model's active deployment,
        then wait up to ``deploy_wait_s`` until the gateway serves it (its versions, over
        gRPC; the model, over HTTP)."""
        deployment = self.registry.deploy(model, version, split, actor=self.actor)
        wait_s = self.deploy_wait_s
        if not self.gateway or wait_s <= 0:
            return deployment
        wanted = {v.version for v in deployment.variants}
        deadline = time.monotonic() + wait_s
        while True:
            served = self._served_versions(model)
            if served == wanted:
                return deployment
            if time.monotonic() > deadline:
                raise errors.DeadlineExceededError(
                    f"gateway {self.gateway} does not serve {model} versions {sorted(wanted)} "
                    f"after {wait_s:.0f} s (it serves {sorted(served or [])}); see its log"
                )
            time.sleep(0.1)

    def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Mapping[str, Any] | None = None,
    ) -> PredictionResult:
        """Predictions from the gateway (the model's active deployment)."""
        from carrara.gateway.engine import PredictionResult
        from carrara.gateway.http_front import HttpPrediction, HttpPredictResponse

        if isinstance(entity_ids, str):
            raise errors.InvalidArgumentError("entity_ids must be a list of ids, not one string")
        target = self._need_gateway()
        if self._is_grpc():
            import grpc

            from carrara.gateway.grpc_client import predict_stub
            from carrara.v1 import predict_pb2

            request = predict_pb2.PredictRequest(
                model=model,
                entity_ids=list(entity_ids),
                overrides=[
                    predict_pb2.FeatureOverride(name=k, values=_floats(v))
                    for k, v in (overrides or {}).items()
                ],
            )
            try:
                r = predict_stub(self._grpc())(
                    request, timeout=self.timeout_s, metadata=self._grpc_metadata()
                )
            except grpc.RpcError as exc:
                cls = errors.GRPC_CODES.get(exc.code().name, errors.InternalError)
                raise cls(f"gateway: {exc.details()}") from exc
            preds = [
                HttpPrediction(p.entity_id, list(p.values), p.variant, p.model_version, p.degraded)
                for p in r.predictions
            ]
            model_name, request_id, latency_us = r.model, r.request_id, r.latency_us
        else:
            body: dict[str, Any] = {"entity_ids": list(entity_ids)}
            if overrides:
                body["overrides"] = {
                    k: _floats(v) if np.ndim(v) else float(v) for k, v in overrides.items()
                }
            try:
                response = self._gw_http().post(
                    f"/predict/{model}",
                    content=msgspec.json.encode(body),
                    headers={"content-type": "application/json"},
                )
            except httpx.HTTPError as exc:
                raise errors.UnavailableError(f"gateway {target} unreachable: {exc}") from exc
            raise_for_error(response, "gateway")
            out = msgspec.json.decode(response.content, type=HttpPredictResponse)
            preds = out.predictions
            model_name, request_id, latency_us = out.model, out.request_id, out.latency_us
        width = len(preds[0].values) if preds else 0
        return PredictionResult(
            model=model_name,
            request_id=request_id,
            entity_ids=[p.entity_id for p in preds],
            outputs=np.array([p.values for p in preds], dtype=np.float32).reshape(
                len(preds), width
            ),
            variants=[p.variant for p in preds],
            versions=[p.model_version for p in preds],
            degraded=[p.degraded for p in preds],
            latency_us=latency_us,
        )

    @contextmanager
    def serve(self, *, grpc_port: int = 0, http_port: int = 0) -> Iterator[GatewayServer]:
        """Not remote: the gateway of ``carrara up`` already serves; predict through it."""
        raise _not_remote(
            "serve", f"the running gateway ({self.gateway or 'see carrara up'}) serves"
        )
        yield  # pragma: no cover - a generator, so the error comes at ``with``

    def flush_predictions(self) -> None:
        """The gateway writes its prediction log continuously (every 50 ms): wait that long
        plus a margin, so what was predicted so far is on the event log."""
        time.sleep(GATEWAY_LOG_FLUSH_S)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._gateway_http is not None:
            self._gateway_http.close()
            self._gateway_http = None
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
