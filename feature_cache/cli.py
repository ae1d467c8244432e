"""``carrara apply`` and ``carrara materialize`` (registered by ``carrara.cli``)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _service(args: argparse.Namespace) -> Any:
    from carrara.config import load_settings
    from carrara.feature_cache.service import FeatureService

    settings = load_settings(getattr(args, "config", None))
    return FeatureService.from_settings(settings)


def _cmd_apply(args: argparse.Namespace) -> int:
    from rich.console import Console

    from carrara.feature_cache.definitions import load_definitions

    definitions = load_definitions(args.definitions)
    console = Console()
    with _service(args) as service:
        changes = service.apply(definitions, dry_run=args.dry_run)
    for c in changes:
        version = f" v{c.version}" if c.version else ""
        detail = f" ({c.detail})" if c.detail else ""
        console.print(f"{c.kind} {c.name}{version}: {c.action}{detail}", highlight=False)
    if args.dry_run:
        console.print("dry run: nothing written")
    return 0


def _cmd_materialize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from carrara.feature_cache.online_store import EmbeddedOnlineStore

    console = Console()
    with _service(args) as service:
        if isinstance(service.online, EmbeddedOnlineStore):
            console.print(
                "note: the online store is in-process (memory://), so values written here last"
                " only as long as this command; set CARRARA_ONLINE_STORE_URL=redis://host:port/0"
                " to keep them",
                highlight=False,
            )
        if args.stream:
            consumer = service.stream_materializer(consumer_group=args.consumer_group)
            r = consumer.run(
                max_events=args.max_events,
                max_seconds=args.max_seconds,
                stop_when_idle=args.until_idle,
            )
            console.print(
                f"stream: {r.events} events, {r.rows} rows, {r.online_written} online writes,"
                f" {r.offline_rows} offline rows, {r.skipped_events} skipped",
                highlight=False,
            )
            return 0
        for res in service.materialize(args.group, full=args.full, progress=not args.quiet):
            console.print(f"{res.summary()} in {res.seconds:.2f}s", highlight=False)
    return 0


def register(subparsers: Any) -> None:
    """Add the feature platform's commands to the ``carrara`` parser."""
    apply = subparsers.add_parser(
        "apply", help="register feature definitions (a .py or .yaml file, or a module)"
    )
    apply.add_argument("definitions", help="definitions file (.py/.yaml) or importable module")
    apply.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    apply.add_argument("--config", help="Carrara TOML config file")
    apply.set_defaults(func=_cmd_apply)

    mat = subparsers.add_parser(
        "materialize", help="copy feature values to the online store (batch or --stream)"
    )
    mat.add_argument("group", nargs="?", help="feature group (default: every online group)")
    mat.add_argument("--full", action="store_true", help="ignore the last run's watermark")
    mat.add_argument("--quiet", action="store_true", help="no progress bar")
    mat.add_argument("--stream", action="store_true", help="consume the feature-updates topic")
    mat.add_argument("--consumer-group", default="feature-materializer")
    mat.add_argument("--max-events", type=int, help="stream: stop after this many events")
    mat.add_argument("--max-seconds", type=float, help="stream: stop after this long")
    mat.add_argument(
        "--until-idle", action="store_true", help="stream: stop when the topic is drained"
    )
    mat.add_argument("--config", help="Carrara TOML config file")
    mat.set_defaults(func=_cmd_materialize)
