"""``carrara train``: submit a job spec, watch, list, cancel, and run a worker.

The queue lives in the registry database of the settings (``--config``); the worker opens the
feature service and the registry from the same settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        with JobQueue.open(settings.resolved_registry_url, events=events) as queue:
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


def _cmd_worker(args: argparse.Namespace) -> int:
    from carrara.config import load_settings
    from carrara.feature_cache.service import FeatureService
    from carrara.registry.registry import ModelRegistry

    from .worker import Worker

    settings = load_settings(args.config)
    with (
        _open_queue(args) as queue,
        FeatureService.from_settings(settings) as features,
        ModelRegistry.open(
            settings.resolved_registry_url, settings.resolved_artifact_path
        ) as registry,
    ):
        worker = Worker(queue, features=features, registry=registry)
        finished = worker.run(until_idle=args.until_idle, poll_interval_s=args.poll)
    for job in finished:
        print(_line(job))
    return 0 if all(j.state != "FAILED" for j in finished) else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``train`` command group to the top-level CLI."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML settings file (default: $CARRARA_CONFIG)")

    train = sub.add_parser("train", help="training jobs: submit, status, list, cancel, worker")
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
    p = add("worker", _cmd_worker, "claim and run jobs")
    p.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls when idle")
