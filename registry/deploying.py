"""Deployments: making a traffic split a model's active deployment, rollback, and reading
the deployment history gateways follow.

Every change is one transaction under the model's row lock that deactivates the previous
deployment, inserts the new one, audits it and records a ``Topic.DEPLOYMENTS`` event in the
outbox (payload: msgspec JSON ``Deployment``), published once the transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from carrara.errors import FailedPreconditionError, NotFoundError
from carrara.registry.artifacts import ArtifactStore
from carrara.registry.audit import AuditMixin
from carrara.registry.auth import Principal, require_role
from carrara.registry.deployments import (
    Served,
    default_split,
    deployed_variants,
    split_versions,
    validate_split,
)
from carrara.registry.outbox import OutboxMixin, enqueue_event
from carrara.registry.records import (
    latest_decisions,
    model_row,
    spec_decoder,
    split_decoder,
    to_json,
    version_row,
)
from carrara.registry.types import Deployment, TrafficSplit
from carrara.registry.util import now_iso
from carrara.sql import Transaction
from carrara.types import Topic

__all__ = ["DeploymentsMixin", "active_in", "deployments_where"]

_DEPLOYMENT_COLUMNS = (
    "d.deployment_id, m.name, v.version_number, d.traffic_split_json, d.serving_endpoint,"
    " d.created_by, d.created_at, d.is_active, d.rollback_of, d.previous_id"
)


def deployments_where(tx: Transaction, where: str, params: Sequence[Any]) -> list[Deployment]:
    """The deployments matching a SQL condition over ``deployments d``, oldest first, each
    with its variants' serving artifacts."""
    rows = tx.fetchall(
        f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d JOIN models m"
        " ON m.model_id = d.model_id JOIN model_versions v ON v.version_id = d.version_id"
        f" WHERE {where} ORDER BY d.deployment_id",
        params,
    )
    out = []
    for r in rows:
        split = split_decoder.decode(r[3])
        out.append(
            Deployment(
                deployment_id=r[0],
                model=r[1],
                version=r[2],
                traffic_split=split,
                variants=deployed_variants(split, _artifact_map(tx, r[1], split_versions(split))),
                serving_endpoint=r[4],
                created_by=r[5],
                created_at=r[6],
                is_active=bool(r[7]),
                rollback_of=r[8],
            )
        )
    return out


def _artifact_map(tx: Transaction, name: str, versions: list[int]) -> dict[int, Served]:
    if not versions:
        return {}
    marks = ", ".join("?" for _ in versions)
    rows = tx.fetchall(
        "SELECT v.version_number, v.artifact_path, v.artifact_sha256, v.serving_spec_json"
        " FROM model_versions v JOIN models m ON m.model_id = v.model_id"
        f" WHERE m.name = ? AND v.version_number IN ({marks})",
        [name, *versions],
    )
    return {r[0]: Served(r[1], r[2], spec_decoder.decode(r[3])) for r in rows}


def active_in(tx: Transaction, model_id: int) -> Deployment | None:
    """The model's active deployment, read in ``tx``, or None."""
    found = deployments_where(tx, "d.model_id = ? AND d.is_active = 1", (model_id,))
    return found[0] if found else None


def _check_live_approvals(
    tx: Transaction, name: str, split: TrafficSplit, found: Mapping[int, Sequence[Any]]
) -> None:
    """On a high-stakes model, a version may take live traffic (routed, canary or
    fallback) only once PRODUCTION or approved; shadows see traffic but answer nobody."""
    live = {v.version for v in split.variants}
    if split.fallback is not None:
        live.add(split.fallback.version)
    staging = sorted(n for n in live if found[n][1] == "STAGING")
    if not staging:
        return
    # The latest decision counts: a rejection after an approval takes the approval back.
    latest = latest_decisions(tx, [found[n][4] for n in staging])
    missing = [n for n in staging if latest.get(found[n][4], ("", "", "", ""))[3] != "approved"]
    if missing:
        raise FailedPreconditionError(
            f"model {name!r} is high-stakes: STAGING version(s) {missing} have no approval "
            "(or were rejected since) and may not take live traffic; have a user with the "
            f"'approver' role run carrara models approve {name} {missing[0]}, or deploy them "
            "as shadows"
        )


class DeploymentsMixin(AuditMixin, OutboxMixin):
    """Deploy, roll back and read deployments; each change is published through the outbox."""

    artifacts: ArtifactStore

    def deploy(
        self,
        name: str,
        version: int,
        split: TrafficSplit | None = None,
        *,
        actor: Principal,
        serving_endpoint: str = "",
        prepare: Callable[[Deployment], None] | None = None,
    ) -> Deployment:
        """Make a traffic split the model's active deployment and publish it to gateways.

        Checked before anything is recorded: every version exists, none is archived, each has
        a serving artifact that matches its registered sha256, and on a high-stakes model every
        version taking live traffic (routed or fallback; shadows excepted) is PRODUCTION or
        approved. ``prepare`` (e.g. loading the model in an embedded gateway) runs before the
        commit; if it raises, nothing is recorded.
        """
        require_role(actor, "deployer", "deploying a model")
        split = split or default_split(version)
        validate_split(split, version)
        with self.db.transaction() as tx:
            model = model_row(tx, name, lock=True)
            path_version = version_row(tx, model, version)
            wanted = split_versions(split)
            marks = ", ".join("?" for _ in wanted)
            rows = tx.fetchall(
                "SELECT version_number, status, artifact_path, artifact_sha256, version_id"
                f" FROM model_versions WHERE model_id = ? AND version_number IN ({marks})",
                [model[0], *wanted],
            )
            found = {r[0]: r for r in rows}
            missing = [n for n in wanted if n not in found]
            if missing:
                raise NotFoundError(
                    f"the split names version(s) {missing} that model {name!r} does not have; "
                    f"latest is {model[4]}"
                )
            archived = [n for n in wanted if found[n][1] == "ARCHIVED"]
            if archived:
                raise FailedPreconditionError(
                    f"the split names archived version(s) {archived} of model {name!r}; "
                    "deploy STAGING or PRODUCTION versions"
                )
            no_serving = [n for n in wanted if not found[n][2]]
            if no_serving:
                raise FailedPreconditionError(
                    f"version(s) {no_serving} of model {name!r} have no serving (ONNX) artifact"
                )
            if model[2]:
                _check_live_approvals(tx, name, split, found)
            for n in wanted:
                self.artifacts.verify(
                    found[n][2], found[n][3], what=f"serving artifact of {name!r} version {n}"
                )
            deployment = self._insert_deployment(
                tx,
                model,
                path_version[0],
                split,
                actor,
                serving_endpoint,
                rollback_of=None,
                action="deployment.create",
            )
            if prepare is not None:
                prepare(deployment)
        self.publish_pending()
        return deployment

    def _insert_deployment(
        self,
        tx: Transaction,
        model: tuple[Any, ...],
        version_id: int,
        split: TrafficSplit,
        actor: Principal,
        serving_endpoint: str,
        *,
        rollback_of: int | None,
        action: str,
    ) -> Deployment:
        previous = active_in(tx, model[0])
        if previous is not None:
            tx.execute(
                "UPDATE deployments SET is_active = 0 WHERE deployment_id = ?",
                (previous.deployment_id,),
            )
        row = tx.fetchone(
            "INSERT INTO deployments (model_id, version_id, traffic_split_json, serving_endpoint,"
            " created_by, created_at, is_active, previous_id, rollback_of)"
            " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) RETURNING deployment_id",
            (
                model[0],
                version_id,
                to_json(split),
                serving_endpoint,
                actor.subject,
                now_iso(),
                previous.deployment_id if previous else None,
                rollback_of,
            ),
        )
        assert row is not None
        deployment = deployments_where(tx, "d.deployment_id = ?", (row[0],))[0]
        self._audit(
            tx,
            model[0],
            version_id,
            actor,
            action,
            {
                "deployment_id": row[0],
                "previous_id": previous.deployment_id if previous else None,
                "rollback_of": rollback_of,
                "traffic_split": msgspec.to_builtins(split),
            },
        )
        enqueue_event(tx, Topic.DEPLOYMENTS, to_json(deployment))
        return deployment

    def rollback(self, name: str, *, actor: Principal) -> Deployment:
        """Re-activate the deployment the active one replaced, as a new history entry.

        Its versions may have been archived since (a promotion archives the old production
        version); rolling back to them is allowed on purpose, since it is the emergency path.
        """
        require_role(actor, "deployer", "rolling back a deployment")
        with self.db.transaction() as tx:
            model = model_row(tx, name, lock=True)
            active = tx.fetchone(
                "SELECT deployment_id, previous_id FROM deployments"
                " WHERE model_id = ? AND is_active = 1",
                (model[0],),
            )
            if active is None or active[1] is None:
                raise FailedPreconditionError(
                    f"model {name!r} has no earlier deployment to roll back to"
                    + ("" if active else " (it is not deployed)")
                )
            target = tx.fetchone(
                "SELECT version_id, traffic_split_json, serving_endpoint FROM deployments"
                " WHERE deployment_id = ?",
                (active[1],),
            )
            assert target is not None
            deployment = self._insert_deployment(
                tx,
                model,
                target[0],
                split_decoder.decode(target[1]),
                actor,
                target[2],
                rollback_of=active[0],
                action="deployment.rollback",
            )
        self.publish_pending()
        return deployment

    def active_deployment(self, name: str) -> Deployment | None:
        """The deployment gateways should be serving, or None."""
        with self.db.transaction() as tx:
            return active_in(tx, model_row(tx, name)[0])

    def deployments(self, name: str) -> list[Deployment]:
        """Every deployment of a model, oldest first (the history rollbacks walk)."""
        with self.db.transaction() as tx:
            return deployments_where(tx, "d.model_id = ?", (model_row(tx, name)[0],))
