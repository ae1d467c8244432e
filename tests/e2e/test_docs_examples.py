"""The README tour and every ```` ```python example ```` block of the README and the user docs
run as written, against both entry points of the SDK: ``carrara.Platform.local`` (everything
in this process) and ``carrara.Client`` on ``carrara up`` (the services as processes, on the
real PostgreSQL and Redis). Blocks share one namespace per page, in page order, after the tour
(so ``platform``/``p``, ``trips``, ``labels``, ``version`` are the tour's); the few names a
page leaves to the reader (``frame``, ``ts_us``, ``train_frame``, ...) are set here. Gateway
addresses in the text (``127.0.0.1:8001`` / ``:8000``, the ``carrara up`` defaults) are
pointed at the gateway under test. A block tagged ``sketch`` (one, which needs a TLS gateway
and its certificates) is compiled, not run."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import carrara
from carrara.up import Services

from ..servers import up_config_on_real_stores

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python(?: (\w+))?([^\n]*)\n(.*?)^```$", re.S | re.M)
TOKEN = "docs-bootstrap-token"
LOCAL = 'carrara.Platform.local("carrara-data")'


def python_blocks() -> list[tuple[str, str, str]]:
    """(page, tag, source) of every python block, in page order."""
    return [
        (page.name, tag or "", source)
        for page in PAGES
        for tag, _, source in FENCE.findall(page.read_text())
    ]


def test_every_python_block_is_run_or_says_why_not() -> None:
    found = python_blocks()
    tags = [tag for _, tag, _ in found]
    assert set(tags) <= {"tour", "example", "sketch"}, "tag each ```python block"
    assert tags.count("tour") == 1 and tags.count("example") >= 10
    sketches = [(page, source) for page, tag, source in found if tag == "sketch"]
    assert [page for page, _ in sketches] == ["serving.md"]  # TLS: certificates and a CA
    for page, source in sketches:
        compile(source, page, "exec")


HOUR_US = 3_600_000_000
NOW_US = time.time_ns() // 1000
#: features.md's ride events: rider-1 three hours ago (twice), 30 hours and 3 days ago, well
#: inside or outside the 1d and 7d windows whatever the hour; rider-2 long before the tour's
#: labels; all far from tile edges.
RIDES = pd.DataFrame(
    {
        "rider_id": ["rider-1", "rider-1", "rider-1", "rider-1", "rider-2", "rider-2"],
        "event_timestamp": [
            NOW_US - 3 * HOUR_US,
            NOW_US - 3 * HOUR_US,
            NOW_US - 30 * HOUR_US,
            NOW_US - 72 * HOUR_US,
            1_767_225_600_000_000 - 5 * HOUR_US,  # the tour's t0 - 5h
            1_767_225_600_000_000 - 50 * HOUR_US,
        ],
        "fare": [10.0, 14.0, 20.0, 7.0, 3.0, 5.0],
        "payment": ["card", "cash", "card", "card", "cash", "card"],
    }
)
#: Labels at the tour's t0 for rider-2 (both rides inside 7d, one inside 1d) and rider-1
#: (none of its rides yet).
RIDE_LABELS = pd.DataFrame(
    {
        "rider_id": ["rider-2", "rider-1"],
        "event_timestamp": [1_767_225_600_000_000, 1_767_225_600_000_000],
    }
)


def _tour() -> str:
    [source] = [s for _, tag, s in python_blocks() if tag == "tour"]
    assert LOCAL in source
    return source


def _check_tour(ns: dict[str, Any]) -> None:
    assert ns["job"].state == "SUCCEEDED" and ns["version"] == 1
    assert ns["auc"] > 0.85
    result = ns["result"]
    assert result.entity_ids == ["rider-1", "rider-2"]
    assert list(result.versions) == [1, 1] and not any(result.degraded)
    scores = np.asarray(result.outputs)[:, 0]
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))
    alerts = ns["alerts"]
    assert [(a.kind, a.subject, a.state) for a in alerts] == [("drift", "cancel_rate", "firing")]


def _point_at(source: str, grpc_target: str, http_target: str, api_url: str) -> str:
    return (
        source.replace("127.0.0.1:8001", grpc_target)
        .replace("127.0.0.1:8000", http_target)
        .replace("http://127.0.0.1:8080", api_url)
    )


def run_examples(
    open_platform: Any,
    *,
    remote: bool,
    grpc_target: str,
    http_target: str,
    api_url: str,
    drain_stream: Any,
) -> dict[str, Any]:
    """Run the tour (``open_platform`` in place of ``Platform.local``), then every example."""
    tour: dict[str, Any] = {"__name__": "__tour__", "OPEN_PLATFORM": open_platform}
    exec(compile(_tour().replace(LOCAL, "OPEN_PLATFORM()"), "README.md", "exec"), tour)
    _check_tour(tour)

    from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup
    from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec

    trips = tour["trips"]
    ran: dict[str, Any] = {}
    with open_platform() as p:
        # What the pages leave to the reader, from the tour's data.
        given = {
            "platform": p,
            "p": p,
            "frame": trips,
            "labels": tour["labels"],
            "version": tour["version"],
            "ts_us": tour["t0"] + 2 * 86_400_000_000,
            "train_frame": trips[["ride_count", "cancel_rate"]],
            "train_scores": np.linspace(0.05, 0.95, len(trips)),
            "token": TOKEN,
            "definitions": Definitions(
                entities=(Entity(name="rider", join_key="rider_id"),),
                groups=(
                    FeatureGroup(
                        name="trips",
                        entity="rider",
                        features=(Feature(name="ride_count"), Feature(name="cancel_rate")),
                    ),
                ),
            ),
            "spec": JobSpec(
                model_name="churn",
                dataset=DatasetSpec(
                    features=["trips:ride_count", "trips:cancel_rate"],
                    label_source="labels.parquet",
                    label_column="churned",
                    entity_column="rider_id",
                ),
                model=ModelSpec(framework="sklearn", estimator="logistic_regression"),
            ),
            "online_store": {},  # README "Using it": every key missing, defaults used
            "rides": RIDES,
            "ride_labels": RIDE_LABELS,
        }
        serving = p.serve() if not remote else contextlib.nullcontext()
        with serving as server:
            grpc, http = grpc_target, http_target
            if server is not None:
                grpc, http = f"127.0.0.1:{server.grpc_port}", f"127.0.0.1:{server.http_port}"
            for page, tag, source in python_blocks():
                if tag != "example":
                    continue
                if page == "sdk.md" and not remote:
                    continue  # it opens both entry points itself: run once, with the services
                ns = ran.setdefault(page, {**given, "__name__": f"__{page}__"})
                text = _point_at(source, grpc, http, api_url)
                exec(compile(text, page, "exec"), ns)
                if "features.publish(" in source:
                    drain_stream(p)
        check_examples(ran, p, remote=remote)  # while ``p`` is open
    return ran


def check_examples(ran: dict[str, Any], p: Any, *, remote: bool) -> None:
    features = ran["features.md"]
    assert features["trips"].name == "trips"  # the features.py block
    assert features["rows"] == 500
    assert features["f"].to_dicts() == [{"cancel_rate": 0.25}, {"cancel_rate": None}]
    frame = features["frame"]
    assert len(frame) == 500 and {"trips__ride_count", "trips__cancel_rate"} <= set(frame.columns)
    assert features["ts"].snapshot_ref
    # Windowed aggregations: online at now and in a training set at the labels' time.
    assert features["now"] == [
        {
            "event_count_1d": 2.0,
            "event_count_7d": 4.0,
            "fare_sum_1d": 24.0,
            "fare_sum_7d": 51.0,
            "fare_mean_7d": 12.75,
            "fare_max_card_7d": 20.0,
            "fare_max_cash_7d": 14.0,
        }
    ]
    history = features["history"]
    rider2 = history[history["rider_id"] == "rider-2"].iloc[0]
    assert rider2["ride_stats__event_count_1d"] == 1 and rider2["ride_stats__event_count_7d"] == 2
    assert (
        rider2["ride_stats__fare_sum_7d"] == 8.0 and rider2["ride_stats__fare_max_cash_7d"] == 3.0
    )
    rider1 = history[history["rider_id"] == "rider-1"].iloc[0]
    assert rider1["ride_stats__event_count_7d"] == 0 and pd.isna(rider1["ride_stats__fare_mean_7d"])
    readme = ran["README.md"]
    assert readme["x"].shape == (2, 1) and readme["missing"].all()
    # Triton's own clients get what the SDK gets: the same scores, the override applied.
    serving = ran["serving.md"]
    np.testing.assert_allclose(
        serving["scores"], p.predict("churn", ["rider-1", "rider-2"]).outputs
    )
    shifted = p.predict("churn", ["rider-1", "rider-2"], overrides={"cancel_rate": 0.5}).outputs
    np.testing.assert_allclose(serving["shifted"], shifted, rtol=1e-6)
    assert not np.allclose(serving["shifted"], serving["scores"])
    assert serving["stats"]["count"] >= 2
    if remote:
        # The same pipeline, embedded and against the services: the same model, so the same
        # score for rider-2. rider-1's online row differs: features.md published a newer one
        # to the services' store, which the fresh embedded platform never saw.
        sdk = ran["sdk.md"]
        assert sdk["embedded"].shape == sdk["remote"].shape == (2, 1)
        np.testing.assert_allclose(sdk["embedded"][1], sdk["remote"][1], rtol=1e-5)
        online = p.features.get_online("trips", ["rider-1"]).to_dicts()
        assert online == [{"ride_count": 3.0, "cancel_rate": 0.25}]


def _drain_local(p: Any) -> None:
    p.features.stream_materializer().run(stop_when_idle=True)


def test_docs_examples_on_platform_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the tour writes relative paths
    ran = run_examples(
        lambda: carrara.Platform.local("carrara-data"),
        remote=False,
        grpc_target="",
        http_target="",
        api_url="",
        drain_stream=_drain_local,
    )
    assert set(ran) == {"README.md", "features.md", "monitoring.md", "serving.md"}


@contextlib.contextmanager
def _services(tmp_path: Path, postgres_url: str, redis_url: str, ns: str) -> Iterator[Services]:
    settings, up = up_config_on_real_stores(
        tmp_path, postgres_url, redis_url, ns, TOKEN, settings={"cache_ttl_seconds": 0.5}
    )
    with Services(settings, up) as svc:
        yield svc


def _wait_online(p: Any) -> None:
    """The materializer process of ``carrara up`` applies the published row."""
    deadline = time.monotonic() + 30
    while p.features.get_online("trips", ["rider-1"], ["cancel_rate"]).to_dicts() != [
        {"cancel_rate": 0.25}
    ]:
        assert time.monotonic() < deadline, "the published row never reached the online store"
        time.sleep(0.2)


@pytest.mark.integration
def test_docs_examples_on_client_and_carrara_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_url: str,
    redis_url: str,
    redis_namespace: str,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)  # a data root of the services: the worker reads labels.parquet
    with _services(tmp_path, postgres_url, redis_url, redis_namespace) as svc:
        ran = run_examples(
            lambda: carrara.Client(svc.api_url, TOKEN, gateway=svc.grpc_url),
            remote=True,
            grpc_target=svc.grpc_target,
            http_target=svc.gateway_url.removeprefix("http://"),
            api_url=svc.api_url,
            drain_stream=_wait_online,
        )
    assert set(ran) == {"README.md", "features.md", "monitoring.md", "sdk.md", "serving.md"}
