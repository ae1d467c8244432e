"""``carrara monitor``: report, a bounded consumer loop, active alerts."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _db_url(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    from carrara.config import load_settings

    return load_settings().resolved_registry_url


def _cmd_report(args: argparse.Namespace) -> int:
    from carrara.sql import connect

    from .report import write_report

    db = connect(_db_url(args))
    try:
        path = write_report(db, args.model, args.out, args.version)
    finally:
        db.close()
    print(f"wrote {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from carrara.config import load_settings
    from carrara.eventlog import open_event_log
    from carrara.sql import connect

    from .alerts import AlertSink, EventLogSink, WebhookSink
    from .consumer import MonitoringConsumer, PollResult

    log_url = args.event_log or load_settings().resolved_event_log_url
    db = connect(_db_url(args))
    event_log = open_event_log(log_url)
    webhooks = [WebhookSink(url) for url in args.webhook]
    sinks: list[AlertSink] = [EventLogSink(event_log), *webhooks]
    try:
        consumer = MonitoringConsumer(
            db,
            event_log,
            group=args.group,
            consumer=args.consumer,
            sinks=sinks,
            batch_size=args.batch_size,
        )
        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, registry=consumer.metrics.registry)
        try:
            total = consumer.run(
                max_polls=args.max_polls,
                duration_s=args.duration,
                stop_when_idle=args.until_idle,
            )
        except KeyboardInterrupt:  # unbounded run stopped by the operator: nothing is lost,
            total = PollResult()  # un-acked events are redelivered to the next run
            print("interrupted")
        alerts = list(total.alerts)
        if args.flush:
            alerts += consumer.judge(flush=True, result=total)
        print(
            f"predictions: {total.predictions_new} new, {total.duplicates} duplicate;"
            f" labels: {total.labels_new} new; windows judged: {total.windows_judged};"
            f" alert transitions: {len(alerts)}"
        )
        for a in alerts:
            print(f"  {a.state:8} {a.key}  {a.message}")
    finally:
        for w in webhooks:
            w.close()
        event_log.close()
        db.close()
    return 0


def _cmd_alerts(args: argparse.Namespace) -> int:
    from carrara.sql import connect

    from .alerts import active_alerts

    db = connect(_db_url(args))
    try:
        alerts = active_alerts(db, args.model)
    finally:
        db.close()
    for a in alerts:
        print(f"{a.key}  since {a.started_ms}  {a.message}")
    if not alerts:
        print("no active alerts")
    return 0


def register(subparsers: Any) -> None:
    monitor = subparsers.add_parser("monitor", help="drift and performance monitoring")
    sub = monitor.add_subparsers(dest="monitor_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", help="registry database URL (default: from settings)")

    report = sub.add_parser("report", help="write the HTML report of a model")
    report.add_argument("model")
    report.add_argument("--version", type=int, default=None, help="default: newest profiled")
    report.add_argument("--out", required=True, help="HTML file to write")
    common(report)
    report.set_defaults(func=_cmd_report)

    run = sub.add_parser("run", help="consume predictions and labels (bounded loop)")
    common(run)
    run.add_argument("--event-log", help="event log URL (default: from settings)")
    run.add_argument("--group", default="monitoring")
    run.add_argument("--consumer", default="monitor-1")
    run.add_argument("--batch-size", type=int, default=500)
    run.add_argument("--max-polls", type=int, default=None)
    run.add_argument("--duration", type=float, default=None, help="seconds to run")
    run.add_argument("--until-idle", action="store_true", help="stop when a poll reads nothing")
    run.add_argument("--flush", action="store_true", help="judge open windows before exiting")
    run.add_argument("--webhook", action="append", default=[], help="POST alerts here")
    run.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics")
    run.set_defaults(func=_cmd_run)

    alerts = sub.add_parser("alerts", help="list active alerts")
    alerts.add_argument("model", nargs="?", default=None)
    common(alerts)
    alerts.set_defaults(func=_cmd_alerts)


def main(argv: list[str] | None = None) -> int:
    """``carrara monitor ...`` on its own (``python -m carrara.monitoring.cli monitor ...``);
    errors are reported as the ``carrara`` command reports them."""
    import sys

    from carrara.errors import CarraraError

    parser = argparse.ArgumentParser(prog="carrara")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CarraraError as exc:
        print(f"carrara: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
