"""The ``carrara`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

import carrara

__all__ = ["main"]

# Each part adds its own commands: a module with ``register(subparsers) -> None`` whose
# handlers import their heavy dependencies lazily, so ``carrara --help`` stays fast. With the
# commands it adds and the extra that installs what it needs: an image built for one role
# (``pip install carrara[serving]``) still lists the other commands, which then say what to
# install instead of failing with an ImportError.
PART_CLIS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("carrara.feature_cache.cli", ("apply", "materialize"), "features"),
    ("carrara.registry.cli", ("models",), "platform"),
    ("carrara.training.cli", ("train",), "training"),
    ("carrara.gateway.cli", ("serve", "predict"), "serving"),
    ("carrara.monitoring.cli", ("monitor",), "monitoring"),
    ("carrara.loadgen.cli", ("loadtest",), "serving"),
    ("carrara.up", ("up",), "platform"),  # `carrara up`: every service as local processes
)


def _missing_extra(command: str, extra: str, module: str) -> Callable[[argparse.Namespace], int]:
    def explain(args: argparse.Namespace) -> int:
        print(
            f"carrara: error: 'carrara {command}' needs the {extra!r} extra, which is not "
            f"installed here (no module {module!r}): pip install 'carrara[{extra}]'",
            file=sys.stderr,
        )
        return 2

    return explain


def _cmd_demo(args: argparse.Namespace) -> int:
    from carrara.demo import run_demo

    return run_demo(
        entities=args.entities,
        path=args.path,
        load_seconds=args.load_seconds,
        rate=args.rate,
        train_rows=args.train_rows,
        backend=args.backend,
        pg_url=args.pg_url,
        redis_url=args.redis_url,
        keep=args.keep,
    )


# Each part that keeps tables exposes ``upgrade(url) -> applied migration ids``.
SCHEMA_PARTS = (
    ("registry", "carrara.registry.migrations"),
    ("feature catalog", "carrara.feature_cache.catalog"),
    ("monitoring", "carrara.monitoring.schema"),
    ("training queue", "carrara.training"),
)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from carrara.config import load_settings

    url = args.url or load_settings().resolved_registry_url
    for label, module_name in SCHEMA_PARTS:
        module = importlib.import_module(module_name)
        applied = module.upgrade(url)
        print(f"{label}: {'applied ' + ', '.join(applied) if applied else 'up to date'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carrara",
        description="Carrara: feature store, training, registry, serving and monitoring.",
    )
    parser.add_argument("--version", action="version", version=f"carrara {carrara.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run the whole loop (features -> train -> serve -> monitor) on this machine"
    )
    demo.add_argument("--entities", type=int, default=100_000, help="riders to generate and serve")
    demo.add_argument("--path", help="keep the platform's files here (default: a temporary folder)")
    demo.add_argument(
        "--load-seconds", type=float, default=3.0, help="length of each load run (seconds)"
    )
    demo.add_argument(
        "--rate", type=float, default=400.0, help="offered requests/s of each open-loop load run"
    )
    demo.add_argument(
        "--train-rows",
        type=int,
        default=20_000,
        help="label rows the training jobs use (a random subsample of all label rows)",
    )
    demo.add_argument(
        "--backend",
        default="embedded",
        help="'embedded' (SQLite + in-process stores) or real servers: postgres,redis "
        "(an isolated schema and key prefix per run, dropped at the end)",
    )
    demo.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for --backend postgres (registry, catalog, queue, monitoring)",
    )
    demo.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis for --backend redis (online store and event log)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the platform (needs --path): writes PATH/carrara.toml for `carrara up "
        "--config` and a token for its web console",
    )
    demo.set_defaults(func=_cmd_demo)
    db = sub.add_parser("db", help="database schema of the registry, catalog and monitoring")
    db_sub = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply pending migrations (idempotent)")
    upgrade.add_argument("--url", help="database URL (default: the configured registry URL)")
    upgrade.set_defaults(func=_cmd_db_upgrade)
    for name, commands, extra in PART_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A package of another role is missing: the commands say what to install. A
            # missing module of Carrara itself is a real error.
            if exc.name is None or exc.name.partition(".")[0] == "carrara":
                raise
            for command in commands:
                stub = sub.add_parser(command, help=f"(needs: pip install 'carrara[{extra}]')")
                stub.add_argument("rest", nargs=argparse.REMAINDER)
                stub.set_defaults(func=_missing_extra(command, extra, exc.name))
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except carrara.CarraraError as exc:
        print(f"carrara: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
