"""``carrara train``: submit a job spec, watch, list, cancel, follow logs, run a worker, and
manage and run triggers.

``watch`` reads the ``training-events`` topic (every job state change the queue publishes)
with its own offset, so it leaves nothing behind in the event log: ``carrara train watch JOB``
prints a job's transitions and exits when it ends (0 when it succeeded, 1 otherwise).

The queue lives in the registry database of the settings (``--config``); the worker opens the
feature service and the registry from the same settings.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carrara.feature_cache.service import FeatureService

    from .queue import Job, JobQueue

__all__ = ["register"]


@contextmanager
def _open_queue(args: argparse.Namespace) -> Iterator[JobQueue]:
    from carrara.config import load_settings
    from carrara.eventlog import open_event_log

    from .queue import JobQueue

    settings = load_settings(args.config)
    events = open_event_log(settings.resolved_event_log_url)
    try:
        with JobQueue.open(
            settings.resolved_registry_url,
            events=events,
            gpus_per_node=settings.training_gpus_per_node,
            # As the control plane and the workers: submissions are checked against the data
            # roots, and the label file's existence and columns, before anything is queued.
            data_roots=settings.resolved_data_roots,
        ) as queue:
            yield queue
    finally:
        events.close()


def _line(job: Job) -> str:
    extra = ""
    if job.state == "SUCCEEDED" and "version" in job.result:
        extra = f"  -> {job.model_name} v{job.result['version']}"
    elif job.error:
        extra = f"  ({job.error})"
    return f"{job.job_id}  {job.state:<9}  {job.model_name}{extra}"


def _cmd_submit(args: argparse.Namespace) -> int:
    from carrara.config import load_settings
    from carrara.feature_cache.service import FeatureService

    from .spec import load_spec

    spec = load_spec(args.spec)
    with (
        FeatureService.from_settings(load_settings(args.config)) as features,
        _open_queue(args) as queue,
    ):
        job = queue.submit(spec, submitted_by=args.user, features=features)
    print(job.job_id)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import msgspec

    with _open_queue(args) as queue:
        job = queue.get(args.job_id)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(job)).decode())
    else:
        print(_line(job))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with _open_queue(args) as queue:
        jobs = queue.list(state=args.state, limit=args.limit)
    for job in jobs:
        print(_line(job))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _open_queue(args) as queue:
        print(_line(queue.cancel(args.job_id)))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    import time
    from datetime import UTC, datetime

    from .queue import TERMINAL

    after = args.after
    with _open_queue(args) as queue:
        while True:
            # Read the state first: lines written before a job ended are all visible then.
            state = queue.get(args.job_id).state
            lines = queue.logs(args.job_id, after=after)
            for line in lines:
                at = datetime.fromtimestamp(line.ts_us / 1e6, UTC).strftime("%H:%M:%S")
                print(f"{at} {line.level:<7} {line.message}", flush=True)
                after = line.seq
            if not args.follow or (state in TERMINAL and not lines):
                return 0
            if not lines:
                time.sleep(args.poll)


def _cmd_watch(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    import msgspec

    from carrara.config import load_settings
    from carrara.eventlog import open_event_log
    from carrara.types import Topic

    from .queue import TERMINAL, JobEvent

    decoder = msgspec.json.Decoder(JobEvent)
    after: str | None = None
    with open_event_log(load_settings(args.config).resolved_event_log_url) as events:
        while True:
            batch = events.read_after(
                Topic.TRAINING_EVENTS, after, count=100, block_ms=int(args.poll * 1000)
            )
            for event in batch:
                after = event.id
                try:
                    change = decoder.decode(event.payload)
                except msgspec.DecodeError:
                    continue  # not a JobEvent: written by something else, skip it
                if args.job_id and change.job_id != args.job_id:
                    continue
                at = datetime.fromtimestamp(change.at_us / 1e6, UTC).strftime("%H:%M:%S")
                detail = f"  ({change.error})" if change.error else ""
                if "version" in change.result:
                    detail = f"  -> {change.model_name} v{change.result['version']}"
                print(
                    f"{at} {change.job_id}  {change.state:<9}  {change.model_name}"
                    f"  attempt {change.attempt}{detail}",
                    flush=True,
                )
                if args.job_id and change.state in TERMINAL:
                    return 0 if change.state == "SUCCEEDED" else 1
            if not batch and not (args.follow or args.job_id):
                return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from carrara.config import load_settings
    from carrara.feature_cache.service import FeatureService
    from carrara.registry.registry import ModelRegistry

    from .scheduler import parse_gpus, parse_mig
    from .worker import Worker

    try:
        gpus = parse_gpus(args.gpus)
    except ValueError as exc:
        print(f"--gpus: {exc}", file=sys.stderr)
        return 2
    try:
        mig = parse_mig(args.mig)
    except ValueError as exc:
        print(f"--mig: {exc}", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    # Flags not given: the settings' (CARRARA_TRAINING_PREEMPTION_NOTICE / _POLL_S).
    notice = args.preemption_notice
    if notice is None:
        notice = settings.training_preemption_notice
    poll_s = args.preemption_poll_s
    if poll_s is None:
        poll_s = settings.training_preemption_poll_s
    if not poll_s > 0:
        print(f"--preemption-poll-s must be > 0, got {poll_s}", file=sys.stderr)
        return 2
    with (
        _open_queue(args) as queue,
        FeatureService.from_settings(settings) as features,
        ModelRegistry.open(
            settings.resolved_registry_url, settings.resolved_artifact_path
        ) as registry,
    ):
        if args.lease_timeout is not None:
            queue.lease_timeout_s = args.lease_timeout
        worker = Worker(
            queue,
            features=features,
            registry=registry,
            node=args.node or None,
            gpus=gpus,
            mig=mig,
            address=args.address or None,
            heartbeat_interval_s=min(5.0, queue.lease_timeout_s / 3),
            data_roots=settings.resolved_data_roots,
            preemption_notice=notice or None,
            preemption_poll_s=poll_s,
        )
        # SIGTERM (Kubernetes, `carrara up`, a spot VM's shutdown) or a preemption notice:
        # the running job checkpoints at its next step, goes back to the queue and resumes
        # from that checkpoint on another worker.
        previous = signal.signal(signal.SIGTERM, lambda *_: worker.preempt("SIGTERM"))
        try:
            finished = worker.run(until_idle=args.until_idle, poll_interval_s=args.poll)
        finally:
            signal.signal(signal.SIGTERM, previous)
    for job in finished:
        print(_line(job))
    return 0 if all(j.state != "FAILED" for j in finished) else 1


@contextmanager
def _open_triggers(args: argparse.Namespace) -> Iterator[tuple[JobQueue, FeatureService]]:
    from carrara.config import load_settings
    from carrara.feature_cache.service import FeatureService

    with (
        FeatureService.from_settings(load_settings(args.config)) as features,
        _open_queue(args) as queue,
    ):
        yield queue, features


def _cmd_trigger_add(args: argparse.Namespace) -> int:
    from .spec import load_spec
    from .triggers import TriggerStore

    spec = load_spec(args.spec)
    with _open_triggers(args) as (queue, features):
        t = TriggerStore(queue).add(
            args.name,
            args.kind,
            spec,
            schedule=args.schedule,
            model=args.model,
            created_by=args.user,
            features=features,
        )
    print(f"added {t.kind} trigger {t.name} for model {t.spec.model_name}")
    return 0


def _cmd_trigger_list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from .triggers import TriggerStore

    with _open_queue(args) as queue:
        triggers = TriggerStore(queue).list()
    for t in triggers:
        what = {"schedule": t.schedule, "alert": f"alerts of {t.alert_model}"}.get(
            t.kind, ",".join(t.groups) if t.kind == "new_data" else ""
        )
        last = (
            datetime.fromtimestamp(t.last_fired_at_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%MZ")
            if t.last_fired_at_us
            else "never"
        )
        pending = "  (follow-up owed)" if t.pending else ""
        print(f"{t.name}  {t.kind:<8}  {what}  -> {t.spec.model_name}  last: {last}{pending}")
    return 0


def _cmd_trigger_remove(args: argparse.Namespace) -> int:
    from .triggers import TriggerStore

    with _open_queue(args) as queue:
        print(f"removed trigger {TriggerStore(queue).remove(args.name).name}")
    return 0


def _cmd_trigger_run(args: argparse.Namespace) -> int:
    from .triggers import TriggerStore

    with _open_triggers(args) as (queue, features):
        fire = TriggerStore(queue).fire(args.name, reason="manual (CLI)", features=features)
    if fire.outcome == "submitted":
        print(fire.job_id)
    elif fire.outcome == "deferred":
        print(f"run {fire.job_id} of {args.name} is active; one follow-up run is queued after it")
    else:
        print(f"trigger {args.name} did not fire: {fire.error}", file=sys.stderr)
        return 1
    return 0


def _cmd_triggers_loop(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .triggers import TriggerRunner

    with _open_triggers(args) as (queue, features):
        runner = TriggerRunner(queue, events=queue.events, features=features)
        if args.once:
            for fire in runner.poll_once():
                reasons = "; ".join(fire.reasons)
                print(f"{fire.trigger}  {fire.outcome}  {fire.job_id or ''}  {reasons}")
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        runner.run_forever(stop, interval_s=args.interval)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``train`` command group to the top-level CLI."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML settings file (default: $CARRARA_CONFIG)")

    train = sub.add_parser(
        "train", help="training jobs: submit, status, list, cancel, logs, watch, worker, triggers"
    )
    cmds = train.add_subparsers(dest="train_command", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = cmds.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("submit", _cmd_submit, "validate a job spec (YAML/JSON) and queue it")
    p.add_argument("spec")
    p.add_argument("--user", default="", help="who submits (recorded on the job)")
    p = add("status", _cmd_status, "show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p = add("list", _cmd_list, "list jobs, newest first")
    p.add_argument("--state", choices=["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"])
    p.add_argument("--limit", type=int, default=50)
    p = add("cancel", _cmd_cancel, "cancel a queued job, or ask a running one to stop")
    p.add_argument("job_id")
    p = add("logs", _cmd_logs, "print a job's log lines")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    p.add_argument("--after", type=int, default=0, help="only lines after this seq")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls (--follow)")
    p = add("watch", _cmd_watch, "print job state changes from the training-events topic")
    p.add_argument("job_id", nargs="?", default="", help="only this job; exit when it ends")
    p.add_argument(
        "--follow", "-f", action="store_true", help="keep waiting for changes (implied by JOB)"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds each read waits for events")
    p = add("worker", _cmd_worker, "claim and run jobs")
    p.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls when idle")
    p.add_argument("--gpus", default="", help="GPU ids this worker may use, e.g. 0,1")
    p.add_argument("--node", default="", help="node name for GPU leases (default: hostname)")
    p.add_argument(
        "--mig",
        default="",
        metavar="PROFILE=ID,...",
        help="MIG instances this worker may use, e.g. 1g.10gb=MIG-2f1c...,3g.40gb=MIG-9a0e...",
    )
    p.add_argument(
        "--address",
        default="",
        help="where the other nodes of a multi-node job reach this one when it holds node "
        "rank 0 (default: the hostname)",
    )
    p.add_argument(
        "--lease-timeout",
        type=float,
        default=None,
        help="seconds without a heartbeat before a RUNNING job is requeued (default 60)",
    )
    p.add_argument(
        "--preemption-notice",
        default=None,
        metavar="PATH_OR_URL",
        help="spot preemption notice: a file (notice once it exists) or an http(s) URL (notice "
        "once it answers 200 with a body other than FALSE), e.g. AWS "
        "http://169.254.169.254/latest/meta-data/spot/instance-action or GCP "
        "http://metadata.google.internal/computeMetadata/v1/instance/preempted; on a notice "
        "the running job checkpoints at its next step and is handed back (default: the "
        "training_preemption_notice setting; none)",
    )
    p.add_argument(
        "--preemption-poll-s",
        type=float,
        default=None,
        help="seconds between polls of --preemption-notice (default: the "
        "training_preemption_poll_s setting; 1)",
    )

    p = add("triggers", _cmd_triggers_loop, "run the trigger loop, or manage triggers")
    p.add_argument("--once", action="store_true", help="evaluate every trigger once and exit")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    tcmds = p.add_subparsers(dest="triggers_command", metavar="ACTION")
    t = tcmds.add_parser("add", help="add a trigger", parents=[common])
    t.set_defaults(func=_cmd_trigger_add)
    t.add_argument("name")
    t.add_argument("--kind", required=True, choices=["manual", "schedule", "new_data", "alert"])
    t.add_argument("--spec", required=True, help="job spec file (YAML/JSON) to submit")
    t.add_argument("--schedule", default="", help="cron (UTC), for --kind schedule")
    t.add_argument("--model", default="", help="whose alerts fire it (default: the spec's)")
    t.add_argument("--user", default="", help="who adds it")
    t = tcmds.add_parser("list", help="list triggers", parents=[common])
    t.set_defaults(func=_cmd_trigger_list)
    t = tcmds.add_parser("remove", help="remove a trigger", parents=[common])
    t.set_defaults(func=_cmd_trigger_remove)
    t.add_argument("name")
    t = tcmds.add_parser("run", help="fire a trigger now", parents=[common])
    t.set_defaults(func=_cmd_trigger_run)
    t.add_argument("name")
