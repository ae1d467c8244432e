"""``carrara models ...``: the registry from the command line, embedded or against a server.

Without ``--server`` the commands open the registry named by the settings (SQLite by default)
directly (a ``ModelRegistry``); with it they call the REST API (a ``RegistryClient``): the
same methods either way, with ``actor=`` the token's principal. Writes need ``--token`` (or
``CARRARA_API_TOKEN``); ``carrara models token create`` makes one and needs database access.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carrara.registry.auth import Principal
    from carrara.registry.client import RegistryAPI
    from carrara.registry.registry import ModelRegistry

__all__ = ["register"]


def _print(value: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def _pairs(items: list[str] | None, what: str) -> dict[str, float]:
    from carrara.errors import InvalidArgumentError

    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise InvalidArgumentError(f"{what} must look like name=number, got {item!r}")
    return out


@contextmanager
def _open_registry(args: argparse.Namespace) -> Iterator[ModelRegistry]:
    from carrara.config import load_settings
    from carrara.registry.registry import ModelRegistry

    settings = load_settings(args.config)
    events = None
    if getattr(args, "publish", False):
        from carrara.eventlog import open_event_log

        events = open_event_log(settings.resolved_event_log_url)
    try:
        with ModelRegistry.open(
            settings.resolved_registry_url, settings.resolved_artifact_path, events=events
        ) as reg:
            yield reg
    finally:
        if events is not None:
            events.close()


class _Session:
    """The registry a command calls (the database or the REST API, one set of methods) and
    the ``actor`` its writes name."""

    def __init__(self, registry: RegistryAPI, principal: Principal | None) -> None:
        self.registry = registry
        self._principal = principal

    @property
    def actor(self) -> Principal:
        """Who writes: the token's principal (remotely a stand-in: the server checks the
        token). Without a token, the 401 that says how to get one."""
        if self._principal is None:
            from carrara.errors import UnauthenticatedError

            raise UnauthenticatedError(
                "this command needs a bearer token: pass --token or set CARRARA_API_TOKEN "
                "(create one with 'carrara models token create')"
            )
        return self._principal


@contextmanager
def _client(args: argparse.Namespace, *, publish: bool = False) -> Iterator[_Session]:
    from carrara.config import load_settings

    settings = load_settings(args.config)
    token = args.token or settings.api_token or None
    if args.server:
        from carrara.registry.client import RegistryClient

        with RegistryClient(args.server, token) as client:
            yield _Session(client, client.actor)
        return
    args.publish = publish
    with _open_registry(args) as reg:
        yield _Session(reg, _direct_principal(reg, token, settings.api_token))


def _direct_principal(reg: ModelRegistry, token: str | None, bootstrap: str) -> Principal | None:
    """Who a direct-database command acts as: like the API, the bootstrap token
    (``Settings.api_token``) is an admin and any other token must be in the token table."""
    import hmac

    from carrara.registry.auth import Principal

    if not token:
        return None
    if bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
        return Principal("bootstrap", frozenset({"admin"}))
    return reg.tokens.authenticate(token)


def _cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for m in c.registry.list_models():
            prod = m.production_version if m.production_version is not None else "-"
            print(f"{m.name}\tlatest={m.latest_version}\tproduction={prod}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(
            c.registry.get_version(args.model, args.version)
            if args.version
            else c.registry.get_model(args.model)
        )
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for v in c.registry.list_versions(args.model, status=args.status):
            print(f"{v.version}\t{v.status}\t{v.created_at}\t{v.run_id}")
    return 0


def _gate(text: str) -> Any:
    from carrara.errors import InvalidArgumentError
    from carrara.registry.types import Gate

    parts = text.split(":")
    try:
        metric, dataset = parts[0], parts[1]
        threshold = float(parts[2]) if len(parts) > 2 and parts[2] else None
        margin = float(parts[3]) if len(parts) > 3 and parts[3] else None
    except (IndexError, ValueError):
        raise InvalidArgumentError(
            f"gate must be metric:dataset:threshold[:max_regression[:lower]], got {text!r}"
        ) from None
    lower = len(parts) > 4 and parts[4] == "lower"
    return Gate(
        metric=metric,
        dataset=dataset,
        threshold=threshold,
        max_regression=margin,
        higher_is_better=not lower,
    )


def _cmd_create(args: argparse.Namespace) -> int:
    gates = [_gate(g) for g in args.gate or []]
    with _client(args) as c:
        _print(
            c.registry.create_model(
                args.model,
                actor=c.actor,
                framework=args.framework,
                description=args.description,
                high_stakes=args.high_stakes,
                gates=gates,
            )
        )
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    gates = None if args.gate is None else [_gate(g) for g in args.gate if g]
    with _client(args) as c:
        _print(
            c.registry.update_model(
                args.model,
                actor=c.actor,
                description=args.description,
                high_stakes=args.high_stakes,
                gates=gates,
            )
        )
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    import msgspec

    from carrara.registry.types import Signature

    evaluations: dict[str, dict[str, float]] = {}
    for item in args.eval or []:
        dataset, _, pair = item.partition(":")
        evaluations.setdefault(dataset, {}).update(_pairs([pair], "--eval dataset:metric=value"))
    serving_spec: dict[str, Any] = {}
    if args.serving_spec:
        with open(args.serving_spec, "rb") as fh:
            serving_spec = msgspec.json.decode(fh.read(), type=dict[str, Any])
    signature = None
    if args.signature:
        with open(args.signature, "rb") as fh:
            signature = msgspec.json.decode(fh.read(), type=Signature)
    with _client(args) as c:
        _print(
            c.registry.register(
                args.model,
                actor=c.actor,
                framework=args.framework,
                framework_version=args.framework_version,
                serving_artifact=args.serving,  # a file path: read where the registry is
                native_artifact=args.native,
                native_format=args.native_format,
                metrics=_pairs(args.metric, "--metric"),
                evaluations=evaluations,
                feature_store_version=args.feature_group or [],
                training_dataset_ref=args.dataset,
                signature=signature,
                run_id=args.run_id,
                tags={k: v for k, _, v in (t.partition("=") for t in args.tag or [])},
                serving_spec=serving_spec,
            )
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(
            c.registry.record_evaluation(
                args.model,
                args.version,
                args.dataset,
                _pairs(args.metric, "--metric"),
                actor=c.actor,
            )
        )
    return 0


def _cmd_approve(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.registry.approve(args.model, args.version, actor=c.actor, comment=args.comment))
    return 0


def _cmd_reject(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.registry.reject(args.model, args.version, actor=c.actor, reason=args.reason))
    return 0


def _cmd_pending(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.registry.pending_approvals())
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.registry.promote(args.model, args.version, actor=c.actor))
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.registry.archive(args.model, args.version, actor=c.actor))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    import msgspec

    from carrara.errors import InvalidArgumentError
    from carrara.registry.types import TrafficSplit

    split = None
    if args.split:
        text = args.split
        if text.startswith("@"):
            with open(text[1:], "rb") as fh:
                text = fh.read().decode()
        try:
            split = msgspec.json.decode(text, type=TrafficSplit)
        except msgspec.DecodeError as exc:
            raise InvalidArgumentError(f"--split is not a valid traffic split: {exc}") from exc
    with _client(args, publish=True) as c:
        _print(
            c.registry.deploy(
                args.model, args.version, split, actor=c.actor, serving_endpoint=args.endpoint
            )
        )
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args, publish=True) as c:
        _print(c.registry.rollback(args.model, actor=c.actor))
    return 0


def _cmd_deployments(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.registry.deployments(args.model))
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from carrara.errors import InvalidArgumentError

    with _client(args) as c:
        if args.feature_group:
            for v in c.registry.versions_using(args.feature_group):
                print(f"{v.model}\t{v.version}\t{v.status}")
        elif args.model and args.version:
            _print(c.registry.lineage(args.model, args.version))
        else:
            raise InvalidArgumentError("give MODEL VERSION, or --feature-group group:version")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for a in c.registry.audit(args.model):
            print(f"{a.created_at}\t{a.actor}\t{a.action}\tv{a.version}\t{a.detail}")
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    with _open_registry(args) as reg:
        print(reg.tokens.create(args.subject, args.role))
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    with _open_registry(args) as reg:
        for t in reg.tokens.list():
            state = f"revoked {t.revoked_at}" if t.revoked_at else "active"
            print(f"{t.token_id}\t{t.subject}\t{','.join(t.roles)}\t{state}")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    with _open_registry(args) as reg:
        reg.tokens.revoke(args.token_id)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    args.publish = True
    with _open_registry(args) as reg:
        print(f"published {reg.publish_pending()} event(s)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from carrara.config import load_settings
    from carrara.registry.api import create_app

    settings = load_settings(args.config)
    args.publish = True
    with _open_registry(args) as reg:
        app = create_app(reg, bootstrap_token=settings.api_token or None)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``models`` command group to the top-level CLI."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML settings file (default: $CARRARA_CONFIG)")
    common.add_argument("--server", help="registry API URL; default: open the registry directly")
    common.add_argument("--token", help="bearer token (default: $CARRARA_API_TOKEN)")

    models = sub.add_parser("models", help="model registry: register, promote, deploy, lineage")
    cmds = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = cmds.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func)
        return p

    def model_version(p: Any) -> None:
        p.add_argument("model")
        p.add_argument("version", type=int)

    add("list", _cmd_list, "list models")
    p = add("show", _cmd_show, "show a model or one version")
    p.add_argument("model")
    p.add_argument("version", type=int, nargs="?")
    p = add("versions", _cmd_versions, "list a model's versions")
    p.add_argument("model")
    p.add_argument("--status", choices=["STAGING", "PRODUCTION", "ARCHIVED"])
    p = add("create", _cmd_create, "create a model with its promotion gates")
    p.add_argument("model")
    p.add_argument("--framework", default="")
    p.add_argument("--description", default="")
    p.add_argument("--high-stakes", action="store_true", help="promotion needs an approver")
    p.add_argument(
        "--gate",
        action="append",
        help="metric:dataset:threshold[:max_regression[:lower]] (repeatable)",
    )
    p = add("update", _cmd_update, "change a model's promotion policy (admin)")
    p.add_argument("model")
    p.add_argument("--description")
    stakes = p.add_mutually_exclusive_group()
    stakes.add_argument("--high-stakes", dest="high_stakes", action="store_true", default=None)
    stakes.add_argument("--not-high-stakes", dest="high_stakes", action="store_false")
    p.add_argument("--gate", action="append", help="replaces all gates; --gate '' clears them")
    p = add("register", _cmd_register, "register a new version")
    p.add_argument("model")
    p.add_argument("--serving", help="serving artifact (ONNX file)")
    p.add_argument("--native", help="framework-native artifact file")
    p.add_argument("--native-format", default="", help="e.g. pt, pkl, json")
    p.add_argument("--framework", required=True)
    p.add_argument("--framework-version", default="")
    p.add_argument("--metric", action="append", help="name=value (repeatable)")
    p.add_argument("--eval", action="append", help="dataset:metric=value (repeatable)")
    p.add_argument("--feature-group", action="append", help="group:version used (repeatable)")
    p.add_argument("--dataset", default="", help="training dataset snapshot reference")
    p.add_argument("--signature", help="JSON file with inputs/outputs")
    p.add_argument("--serving-spec", help="JSON file passed to gateways (e.g. assembler spec)")
    p.add_argument("--run-id", default="", help="training job/run id")
    p.add_argument("--tag", action="append", help="key=value (repeatable)")
    p = add("evaluate", _cmd_evaluate, "record metrics on an evaluation dataset")
    model_version(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--metric", action="append", required=True, help="name=value (repeatable)")
    p = add("approve", _cmd_approve, "approve a high-stakes promotion (approver role)")
    model_version(p)
    p.add_argument("--comment", default="")
    p = add("reject", _cmd_reject, "reject a version; blocks a high-stakes promotion (approver)")
    model_version(p)
    p.add_argument("--reason", required=True, help="why (shown to the model's owners)")
    add("pending", _cmd_pending, "STAGING versions of high-stakes models awaiting approval")
    model_version(add("promote", _cmd_promote, "run the gates and promote to PRODUCTION"))
    model_version(add("archive", _cmd_archive, "archive a version"))
    p = add("deploy", _cmd_deploy, "deploy a version (optionally with a traffic split)")
    model_version(p)
    p.add_argument("--split", help="TrafficSplit JSON, or @file.json")
    p.add_argument("--endpoint", default="", help="serving endpoint name")
    p = add("rollback", _cmd_rollback, "roll back to the previous deployment")
    p.add_argument("model")
    p = add("deployments", _cmd_deployments, "deployment history")
    p.add_argument("model")
    p = add("lineage", _cmd_lineage, "what produced a version, or who used a feature group")
    p.add_argument("model", nargs="?")
    p.add_argument("version", type=int, nargs="?")
    p.add_argument("--feature-group", help="group:version: list the model versions that used it")
    p = add("audit", _cmd_audit, "a model's audit log")
    p.add_argument("model")
    add("publish", _cmd_publish, "send deployment events still waiting in the outbox")
    p = add("serve", _cmd_serve, "run the registry REST API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)

    token = cmds.add_parser("token", help="API tokens (needs direct database access)")
    tcmds = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    p = tcmds.add_parser("create", help="create a token; printed once", parents=[common])
    p.add_argument("--subject", required=True, help="user or service the token is for")
    p.add_argument("--role", action="append", required=True, help="reader, publisher, ...")
    p.set_defaults(func=_cmd_token_create)
    p = tcmds.add_parser("list", help="list tokens", parents=[common])
    p.set_defaults(func=_cmd_token_list)
    p = tcmds.add_parser("revoke", help="revoke a token by id", parents=[common])
    p.add_argument("token_id", type=int)
    p.set_defaults(func=_cmd_token_revoke)
