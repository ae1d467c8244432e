"""Training triggers on SQLite: cron parsing and due minutes, new-data (offline appends and
feature-updates events), alerts per model, coalescing to one follow-up, restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pandas as pd
import pytest

from carrara.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from carrara.eventlog import EventLog, open_event_log
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.feature_cache.streaming import publish_rows
from carrara.monitoring.alerts import Alert, EventLogSink
from carrara.training.queue import JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec
from carrara.training.triggers import CronSchedule, TriggerRunner, TriggerStore

T0_US = 1_780_000_000_000_000


def make_spec(name: str = "churn", features: tuple[str, ...] = ("trips:x",)) -> JobSpec:
    return JobSpec(
        model_name=name,
        dataset=DatasetSpec(
            features=list(features), label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(estimator="ridge", task="regression"),
    )


def minute(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# -- cron ----------------------------------------------------------------------------------


def test_cron_fields_lists_ranges_steps_names() -> None:
    c = CronSchedule("*/15 9-17 * * mon-fri")
    assert c.matches(datetime(2026, 11, 30, 9, 45, tzinfo=UTC))  # a Monday
    assert c.matches(datetime(2026, 11, 30, 17, 0, 30, tzinfo=UTC))  # within the minute
    assert not c.matches(datetime(2026, 11, 29, 9, 45, tzinfo=UTC))  # Sunday
    assert not c.matches(datetime(2026, 11, 30, 9, 46, tzinfo=UTC))
    assert not c.matches(datetime(2026, 11, 30, 18, 0, tzinfo=UTC))
    jan_jul = CronSchedule("0 0 1,15 jan,jul 7")  # 7 = Sunday too
    assert jan_jul.matches(datetime(2026, 7, 15, tzinfo=UTC))
    assert not jan_jul.matches(datetime(2026, 8, 15, tzinfo=UTC))
    steps = CronSchedule("5/20 * * * *")
    assert [m for m in range(60) if steps.matches(datetime(2026, 1, 1, 0, m, tzinfo=UTC))] == [
        5,
        25,
        45,
    ]
    # Both day fields restricted: either one matches (cron's rule).
    either = CronSchedule("0 0 13 * 5")
    assert either.matches(datetime(2026, 11, 13, tzinfo=UTC))  # the 13th (a Friday too)
    assert either.matches(datetime(2026, 11, 20, tzinfo=UTC))  # a Friday
    assert not either.matches(datetime(2026, 11, 21, tzinfo=UTC))
    for bad, msg in [
        ("* * * *", "needs 5 fields"),
        ("60 * * * *", "Bad minute"),
        ("5-1 * * * *", "Bad minute"),
        ("x * * * *", "Bad minute"),
        ("CRON_TZ=Mars/Olympus 0 3 * * *", "time zone 'Mars/Olympus' is unknown"),
    ]:
        with pytest.raises(InvalidArgumentError, match=msg):
            CronSchedule(bad)


def test_cron_aliases_last_day_nth_weekday_and_time_zones() -> None:
    assert CronSchedule("@daily").matches(datetime(2026, 3, 1, 0, 0, tzinfo=UTC))
    assert CronSchedule("@hourly").matches(datetime(2026, 3, 1, 7, 0, tzinfo=UTC))
    assert not CronSchedule("@weekly").matches(datetime(2026, 3, 2, 0, 0, tzinfo=UTC))  # Monday
    last = CronSchedule("0 3 L * *")  # the last day of the month
    assert last.matches(datetime(2026, 2, 28, 3, 0, tzinfo=UTC))
    assert not last.matches(datetime(2026, 3, 28, 3, 0, tzinfo=UTC))
    second_monday = CronSchedule("0 9 * * 1#2")
    assert second_monday.matches(datetime(2026, 12, 14, 9, 0, tzinfo=UTC))
    assert not second_monday.matches(datetime(2026, 12, 7, 9, 0, tzinfo=UTC))
    # 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer.
    berlin = CronSchedule("CRON_TZ=Europe/Berlin 0 3 * * *")
    assert berlin.matches(datetime(2026, 1, 10, 2, 0, tzinfo=UTC))
    assert berlin.matches(datetime(2026, 7, 10, 1, 0, tzinfo=UTC))
    assert not berlin.matches(datetime(2026, 7, 10, 2, 0, tzinfo=UTC))
    # The spring-forward night has no 02:30: the tick runs once, at the jump (03:00 CEST).
    skipped = CronSchedule("TZ=Europe/Berlin 30 2 * * *")
    jump = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert skipped.latest(jump + timedelta(minutes=30)) == jump
    # The fall-back night has 02:30 twice: it fires once.
    night = [
        m
        for m in range(int(minute("2026-10-24T23:00") // 60), int(minute("2026-10-25T03:00") // 60))
        if skipped.matches(datetime.fromtimestamp(m * 60, UTC))
    ]
    assert len(night) == 1


def test_due_minute_finds_the_latest_tick_in_the_window() -> None:
    c = CronSchedule("0 3 * * *")
    three = int(minute("2026-11-29T03:00") // 60)
    assert c.due_minute(three - 1, three) == three
    assert c.due_minute(three, three + 59) is None  # already checked 03:00
    assert c.due_minute(three - 10, three + 5) == three  # missed while down: fires once
    # One step of the library, however far back the last tick is (no minute-by-minute scan).
    yearly = CronSchedule("@yearly")
    assert yearly.due_minute(three - 2, three) is None
    new_year = int(minute("2027-01-01T00:00") // 60)
    assert yearly.due_minute(new_year - 1, new_year + 30) == new_year


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        yield q


@pytest.fixture
def events() -> Iterator[EventLog]:
    log = open_event_log("local://")
    yield log
    log.close()


@pytest.fixture
def features(tmp_path: Path, events: EventLog) -> Iterator[FeatureService]:
    svc = FeatureService.open(
        catalog_url=f"sqlite:///{tmp_path / 'q.db'}", offline_path=str(tmp_path / "offline")
    )
    svc.apply(
        Definitions(
            entities=(Entity(name="driver", join_key="id"),),
            groups=(
                FeatureGroup(name="trips", entity="driver", features=(Feature(name="x"),)),
                FeatureGroup(name="other", entity="driver", features=(Feature(name="z"),)),
            ),
        )
    )
    yield svc
    svc.close()


def rows(n: int, day: int = 0, col: str = "x") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"d{i}" for i in range(n)],
            "event_timestamp": pd.to_datetime(T0_US + day * 86_400_000_000, unit="us", utc=True),
            col: [float(i) for i in range(n)],
        }
    )


# -- storage and manual --------------------------------------------------------------------


def test_store_crud_and_validation(queue: JobQueue) -> None:
    store = TriggerStore(queue)
    t = store.add("nightly", "schedule", make_spec(), schedule="0 3 * * *", created_by="ana")
    assert t.kind == "schedule" and t.enabled and not t.pending and t.created_by == "ana"
    assert t.spec == make_spec() and t.groups == ["trips"]
    with pytest.raises(AlreadyExistsError):
        store.add("nightly", "manual", make_spec())
    with pytest.raises(InvalidArgumentError, match="needs a cron schedule"):
        store.add("s", "schedule", make_spec())
    with pytest.raises(InvalidArgumentError, match="unknown trigger kind"):
        store.add("k", "hourly", make_spec())
    with pytest.raises(InvalidArgumentError, match="model_name"):
        store.add("bad", "manual", msgspec.structs.replace(make_spec(), model_name="9x"))
    with pytest.raises(InvalidArgumentError, match="trigger name"):
        store.add("9 bad", "manual", make_spec())
    assert [x.name for x in store.list()] == ["nightly"]
    assert store.remove("nightly").name == "nightly"
    with pytest.raises(NotFoundError):
        store.get("nightly")
    with pytest.raises(NotFoundError):
        store.fire("nightly")


def test_manual_fire_never_runs_twice_and_owes_one_follow_up(queue: JobQueue) -> None:
    store = TriggerStore(queue)
    store.add("m", "manual", make_spec())
    first = store.fire("m")
    assert first.outcome == "submitted" and first.job_id is not None
    job = queue.get(first.job_id)
    assert job.trigger == "m" and job.submitted_by == "trigger:m"
    assert "submitted by trigger 'm'" in queue.logs(job.job_id)[0].message
    for _ in range(3):  # while the run is queued/running: deferred, coalesced
        again = store.fire("m")
        assert again.outcome == "deferred" and again.job_id == first.job_id
    assert store.get("m").pending
    runner = TriggerRunner(queue)
    assert runner.poll_once() == []  # still active: nothing new
    claimed = queue.claim("w")
    assert claimed is not None and claimed.job_id == first.job_id
    assert runner.poll_once() == []  # running: still nothing
    queue.complete(claimed)
    (follow,) = runner.poll_once()
    assert follow.outcome == "submitted" and "follow-up" in follow.reasons[0]
    assert runner.poll_once() == []  # exactly one follow-up, whatever arrived meanwhile
    assert len(queue.list(trigger="m")) == 2 and not store.get("m").pending


# -- schedule ------------------------------------------------------------------------------


def test_schedule_fires_once_per_due_minute_with_a_fake_clock(queue: JobQueue) -> None:
    store = TriggerStore(queue)
    store.add("nightly", "schedule", make_spec(), schedule="0 3 * * *")
    # The trigger was created "now" (real clock); move its checked minute to the fake past.
    clock = {"t": minute("2026-11-29T02:58")}
    runner = TriggerRunner(queue, clock=lambda: clock["t"])
    with queue.db.transaction() as tx:
        tx.execute(
            "UPDATE training_triggers SET state_json = ? WHERE name = 'nightly'",
            (msgspec.json.encode({"checked_minute": int(clock["t"] // 60)}).decode(),),
        )
    clock["t"] = minute("2026-11-29T02:59")
    assert runner.poll_once() == []  # not due
    clock["t"] = minute("2026-11-29T03:00") + 5
    (fire,) = runner.poll_once()
    assert fire.outcome == "submitted" and "due at 2026-11-29T03:00Z" in fire.reasons[0]
    clock["t"] += 30  # same minute, polled again
    assert runner.poll_once() == []
    # A restarted runner (fresh object, same database) does not refire the minute.
    assert TriggerRunner(queue, clock=lambda: clock["t"]).poll_once() == []
    job = queue.claim("w")
    assert job is not None
    queue.complete(job)
    clock["t"] = minute("2026-11-30T03:00")
    (nxt,) = runner.poll_once()
    assert nxt.outcome == "submitted" and "2026-11-30T03:00Z" in nxt.reasons[0]
    assert len(queue.list(trigger="nightly")) == 2


# -- new data ------------------------------------------------------------------------------


def test_offline_append_starts_exactly_one_run(
    queue: JobQueue, features: FeatureService, events: EventLog
) -> None:
    store = TriggerStore(queue)
    store.add("fresh", "new_data", make_spec(), features=features)
    store.add("unrelated", "new_data", make_spec("o", ("other:z",)), features=features)
    runner = TriggerRunner(queue, events=events, features=features)
    features.ingest("trips", rows(5))  # before the first look: the baseline
    assert runner.poll_once() == []
    # A batch append (a new date partition) plus several streaming events, polled many times.
    features.ingest("trips", rows(5, day=1))
    publish_rows(events, "trips", [{"id": "d1", "event_timestamp": T0_US, "x": 1.0}])
    publish_rows(events, "trips", [{"id": "d2", "event_timestamp": T0_US, "x": 2.0}])
    fires = runner.poll_once()
    assert [(f.trigger, f.outcome) for f in fires] == [("fresh", "submitted")]
    assert any("new offline data for trips:v1: 1 file(s)" in r for r in fires[0].reasons)
    assert any("feature-updates event for group 'trips'" in r for r in fires[0].reasons)
    for _ in range(5):
        assert runner.poll_once() == []
    assert len(queue.list(trigger="fresh")) == 1 and queue.list(trigger="unrelated") == []
    # Compaction rewrites files but adds no data: no fire.
    features.compact("trips")
    assert runner.poll_once() == []
    # Data arriving during the run: deferred, then exactly one follow-up.
    features.ingest("trips", rows(3, day=2))
    features.ingest("trips", rows(3, day=3))
    (deferred,) = runner.poll_once()
    assert deferred.outcome == "deferred"
    job = queue.claim("w")
    assert job is not None
    queue.complete(job)
    (follow,) = runner.poll_once()
    assert follow.outcome == "submitted"
    assert runner.poll_once() == []
    assert len(queue.list(trigger="fresh")) == 2


def test_events_are_consumed_once_across_restarts(
    queue: JobQueue, features: FeatureService, events: EventLog
) -> None:
    store = TriggerStore(queue)
    publish_rows(events, "trips", [{"id": "d0", "event_timestamp": T0_US, "x": 0.0}])  # old
    time.sleep(0.005)  # event times have millisecond resolution
    store.add("fresh", "new_data", make_spec(), features=features)
    assert TriggerRunner(queue, events=events).poll_once() == []  # older than the trigger
    publish_rows(events, "trips", [{"id": "d1", "event_timestamp": T0_US, "x": 1.0}])
    (fire,) = TriggerRunner(queue, events=events, consumer="a").poll_once()
    job = queue.claim("w")
    assert fire.outcome == "submitted" and job is not None
    queue.complete(job)
    # A new runner process (another consumer, same group) does not see the acked event again.
    assert TriggerRunner(queue, events=events, consumer="b").poll_once() == []
    assert len(queue.list(trigger="fresh")) == 1


# -- alerts --------------------------------------------------------------------------------


def test_alert_for_model_x_fires_only_x(queue: JobQueue, events: EventLog) -> None:
    store = TriggerStore(queue)
    store.add("retrain-x", "alert", make_spec("x"))
    store.add("retrain-y", "alert", make_spec("y-trainer"), model="y")
    runner = TriggerRunner(queue, events=events)
    sink = EventLogSink(events)

    def alert(model: str, state: str = "firing", kind: str = "drift") -> Alert:
        return Alert(
            key=f"{model}:v1:{kind}:f",
            model=model,
            version=1,
            kind=kind,  # type: ignore[arg-type]
            subject="f",
            state=state,  # type: ignore[arg-type]
            started_ms=1,
            timestamp_ms=2,
        )

    sink.send(alert("x", state="resolved"))
    sink.send(alert("z"))
    assert runner.poll_once() == []  # resolved, or another model
    sink.send(alert("x"))
    sink.send(alert("x", kind="performance"))
    (fire,) = runner.poll_once()
    assert fire.trigger == "retrain-x" and fire.outcome == "submitted"
    assert fire.reasons == ["drift alert for model 'x'", "performance alert for model 'x'"]
    sink.send(alert("y"))
    (fire_y,) = runner.poll_once()
    assert (
        fire_y.trigger == "retrain-y" and queue.get(fire_y.job_id or "").model_name == "y-trainer"
    )


def test_new_group_version_counts_as_new_data(queue: JobQueue, features: FeatureService) -> None:
    store = TriggerStore(queue)
    store.add("fresh", "new_data", make_spec(), features=features)
    runner = TriggerRunner(queue, features=features)
    assert runner.poll_once() == []  # baseline: v1 empty
    features.apply(  # a new feature makes trips v2
        Definitions(
            entities=(Entity(name="driver", join_key="id"),),
            groups=(
                FeatureGroup(
                    name="trips", entity="driver", features=(Feature(name="x"), Feature(name="w"))
                ),
                FeatureGroup(name="other", entity="driver", features=(Feature(name="z"),)),
            ),
        )
    )
    features.ingest("trips", rows(4).assign(w=1.0))
    (fire,) = runner.poll_once()
    assert fire.outcome == "submitted" and "trips:v2: 1 file(s)" in fire.reasons[0]
    assert list(store.state("fresh").files) == ["trips:v2"]


def test_run_forever_polls_until_stopped(queue: JobQueue, features: FeatureService) -> None:
    store = TriggerStore(queue)
    store.add("fresh", "new_data", make_spec(), features=features)
    runner = TriggerRunner(queue, features=features)
    runner.poll_once()  # baseline
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_forever, args=(stop,), kwargs={"interval_s": 0.02})
    thread.start()
    try:
        features.ingest("trips", rows(2))
        deadline = time.monotonic() + 10
        while not queue.list(trigger="fresh") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    (job,) = queue.list(trigger="fresh")
    assert job.state == "QUEUED" and job.submitted_by == "trigger:fresh"


def test_a_spec_that_no_longer_validates_fires_nothing(
    queue: JobQueue, features: FeatureService
) -> None:
    store = TriggerStore(queue)
    store.add("m", "manual", make_spec(features=("other:z",)), features=features)
    features.apply(  # group "other" loses feature z
        Definitions(
            entities=(Entity(name="driver", join_key="id"),),
            groups=(
                FeatureGroup(name="trips", entity="driver", features=(Feature(name="x"),)),
                FeatureGroup(name="other", entity="driver", features=(Feature(name="q"),)),
            ),
        )
    )
    fire = store.fire("m", features=features)
    assert fire.outcome == "invalid" and "unknown feature 'other:z'" in fire.error
    assert "unknown feature 'other:z'" in store.get("m").last_error
    assert queue.list() == [] and not store.get("m").pending
