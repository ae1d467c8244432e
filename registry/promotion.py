"""Promotion: evaluation metrics, approvals, the gated promotion to PRODUCTION, archiving.

A promotion runs the model's gates (``gates.py``) against the candidate's recorded evaluations
and the current PRODUCTION version's, requires on a high-stakes model that the version's latest
approver decision be an approval (not a rejection), and archives the previous PRODUCTION
version in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from carrara.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from carrara.registry.auth import Principal, require_role
from carrara.registry.deploying import active_in
from carrara.registry.deployments import split_versions
from carrara.registry.gates import evaluate_gates
from carrara.registry.models import ModelsMixin
from carrara.registry.records import (
    VERSION_COLUMNS,
    check_metrics,
    gates_decoder,
    latest_decisions,
    model_row,
    to_json,
    version_from_row,
    version_row,
)
from carrara.registry.types import (
    Approval,
    Decision,
    GateResult,
    ModelVersion,
    PendingApproval,
    PromotionResult,
)
from carrara.registry.util import now_iso

__all__ = ["Evaluator", "PromotionMixin"]

#: Computes a version's metrics on a named evaluation dataset (used by promotion when the
#: version has no recorded metrics for a gate's dataset).
Evaluator = Callable[[ModelVersion, str], Mapping[str, float]]


class PromotionMixin(ModelsMixin):
    """Evaluations, approvals, gated promotion and archiving of versions."""

    evaluator: Evaluator | None

    # -- evaluations --------------------------------------------------------------------------

    def record_evaluation(
        self,
        name: str,
        version: int,
        dataset: str,
        metrics: Mapping[str, float],
        *,
        actor: Principal,
    ) -> ModelVersion:
        """Record metrics of a version on a named evaluation dataset (what gates read)."""
        require_role(actor, "publisher", "recording evaluation metrics")
        return self._record_evaluation(name, version, dataset, metrics, actor)

    def _record_evaluation(
        self,
        name: str,
        version: int,
        dataset: str,
        metrics: Mapping[str, float],
        actor: Principal,
    ) -> ModelVersion:
        if not dataset:
            raise InvalidArgumentError("an evaluation needs the name of its dataset")
        values = check_metrics(f"evaluation metric on {dataset!r}", metrics)
        with self.db.transaction() as tx:
            model = model_row(tx, name, lock=True)
            v = version_from_row(version_row(tx, model, version))
            evals = {**v.evaluations, dataset: {**v.evaluations.get(dataset, {}), **values}}
            tx.execute(
                "UPDATE model_versions SET evaluations_json = ? WHERE version_id = ?",
                (to_json(evals), v.version_id),
            )
            self._audit(
                tx,
                model[0],
                v.version_id,
                actor,
                "version.evaluate",
                {"version": version, "dataset": dataset, "metrics": values},
            )
        return self.get_version(name, version)

    # -- lifecycle ----------------------------------------------------------------------------

    def approve(self, name: str, version: int, *, actor: Principal, comment: str = "") -> Approval:
        """Sign off a version of a high-stakes model for promotion (approver role only).

        Refused (``AlreadyExistsError``) when the version's latest decision already is this
        approver's approval; after a rejection (anyone's) a new approval is what unblocks."""
        require_role(actor, "approver", "approving a promotion")
        return self._decide(name, version, actor, "approved", comment)

    def reject(self, name: str, version: int, *, actor: Principal, reason: str) -> Approval:
        """Turn down a STAGING version (approver role only), with the ``reason`` the people
        who registered it read. On a high-stakes model the version cannot be promoted while
        this is its latest decision; a later approval unblocks it."""
        require_role(actor, "approver", "rejecting a promotion")
        if not reason.strip():
            raise InvalidArgumentError(
                f"rejecting model {name!r} version {version} needs a reason (--reason)"
            )
        return self._decide(name, version, actor, "rejected", reason)

    def _decide(
        self, name: str, version: int, actor: Principal, decision: Decision, comment: str
    ) -> Approval:
        with self.db.transaction() as tx:
            model = model_row(tx, name, lock=True)
            v = version_from_row(version_row(tx, model, version))
            if v.status != "STAGING":
                raise FailedPreconditionError(
                    f"model {name!r} version {version} is {v.status}; only STAGING versions "
                    f"can be {decision}"
                )
            latest = latest_decisions(tx, [v.version_id]).get(v.version_id)
            if (
                decision == "approved"
                and latest is not None
                and latest[3] == "approved"
                and latest[0] == actor.subject
            ):
                raise AlreadyExistsError(
                    f"{actor.subject!r} already approved model {name!r} version {version}"
                )
            now = now_iso()
            tx.execute(
                "INSERT INTO approvals (version_id, approver, comment, created_at, decision)"
                " VALUES (?, ?, ?, ?, ?)",
                (v.version_id, actor.subject, comment, now, decision),
            )
            detail: dict[str, Any] = {"version": version}
            if decision == "approved":
                detail["comment"] = comment
            else:
                detail["reason"] = comment
            action = "version.approve" if decision == "approved" else "version.reject"
            self._audit(tx, model[0], v.version_id, actor, action, detail)
        return Approval(
            model=name,
            version=version,
            approver=actor.subject,
            comment=comment,
            created_at=now,
            decision=decision,
        )

    def approvals(self, name: str, version: int) -> list[Approval]:
        """Decisions (approvals and rejections) recorded for a version, oldest first."""
        with self.db.transaction() as tx:
            model = model_row(tx, name)
            v = version_row(tx, model, version)
            rows = tx.fetchall(
                "SELECT approver, comment, created_at, decision FROM approvals"
                " WHERE version_id = ? ORDER BY approval_id",
                (v[0],),
            )
        return [
            Approval(
                model=name,
                version=version,
                approver=r[0],
                comment=r[1],
                created_at=r[2],
                decision=r[3],
            )
            for r in rows
        ]

    def pending_approvals(self) -> list[PendingApproval]:
        """Every STAGING version of a high-stakes model whose latest decision is not
        ``approved`` (nobody decided yet, or the latest decision is a rejection), newest
        first, each with its decisions (oldest first): an approver's work queue."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m"
                " ON m.model_id = v.model_id WHERE m.high_stakes <> 0 AND v.status = 'STAGING'"
                " ORDER BY v.version_id DESC"
            )
            decided = tx.fetchall(
                "SELECT a.version_id, a.approver, a.comment, a.created_at, a.decision"
                " FROM approvals a JOIN model_versions v ON v.version_id = a.version_id"
                " JOIN models m ON m.model_id = v.model_id"
                " WHERE m.high_stakes <> 0 AND v.status = 'STAGING' ORDER BY a.approval_id"
            )
        decisions: dict[int, list[tuple[Any, ...]]] = {}
        for r in decided:
            decisions.setdefault(r[0], []).append(tuple(r[1:]))
        out = []
        for row in rows:
            v = version_from_row(row)
            mine = decisions.get(v.version_id, [])
            if mine and mine[-1][3] == "approved":
                continue
            out.append(
                PendingApproval(
                    model=v.model,
                    version=v.version,
                    status=v.status,
                    created_by=v.created_by,
                    created_at=v.created_at,
                    metrics=v.metrics,
                    high_stakes=True,
                    decisions=[
                        Approval(
                            model=v.model,
                            version=v.version,
                            approver=d[0],
                            comment=d[1],
                            created_at=d[2],
                            decision=d[3],
                        )
                        for d in mine
                    ],
                )
            )
        return out

    def promote(self, name: str, version: int, *, actor: Principal) -> PromotionResult:
        """Run the gates (and approval check) and make ``version`` the one PRODUCTION version.

        The previous PRODUCTION version is archived in the same transaction. A refused promotion
        still records its gate results and a ``version.promote_refused`` audit entry, then
        raises ``FailedPreconditionError`` saying which check failed.
        """
        require_role(actor, "deployer", "promoting a version")
        self._run_evaluator(name, version, actor)
        refused: FailedPreconditionError | None = None
        archived: int | None = None
        with self.db.transaction() as tx:
            model = model_row(tx, name, lock=True)
            # The candidate and the current production version in one round trip.
            rows = [
                version_from_row(r)
                for r in tx.fetchall(
                    f"SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m"
                    " ON m.model_id = v.model_id WHERE v.model_id = ?"
                    " AND (v.version_number = ? OR v.status = 'PRODUCTION')",
                    (model[0], version),
                )
            ]
            found = [r for r in rows if r.version == version]
            if not found:
                version_row(tx, model, version)  # raises NotFoundError with the hint
            v = found[0]
            if v.status != "STAGING":
                what = (
                    "it is already the PRODUCTION version"
                    if v.status == "PRODUCTION"
                    else "archived versions cannot return; register a new version"
                )
                raise FailedPreconditionError(
                    f"cannot promote model {name!r} version {version}: {what}"
                )
            prod_rows = [r for r in rows if r.status == "PRODUCTION"]
            prod = prod_rows[0] if prod_rows else None
            gates = gates_decoder.decode(model[3])
            results = evaluate_gates(
                gates,
                v.evaluations,
                prod.evaluations if prod else None,
                production_version=prod.version if prod else None,
            )
            now = now_iso()
            if results:
                tx.execute(
                    "INSERT INTO gate_results (version_id, gate, dataset, metric, value,"
                    " reference, passed, detail, evaluated_by, evaluated_at) VALUES "
                    + ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" for _ in results),
                    [
                        x
                        for r in results
                        for x in (
                            v.version_id,
                            r.gate,
                            r.dataset,
                            r.metric,
                            r.value,
                            r.reference,
                            int(r.passed),
                            r.detail,
                            actor.subject,
                            now,
                        )
                    ],
                )
            failed = [r for r in results if not r.passed]
            reasons = [r.detail for r in failed]
            approvers: list[str] = []
            if model[2]:
                decisions = tx.fetchall(
                    "SELECT approver, comment, decision FROM approvals WHERE version_id = ?"
                    " ORDER BY approval_id",
                    (v.version_id,),
                )
                approvers = list(dict.fromkeys(r[0] for r in decisions if r[2] == "approved"))
                if not decisions:
                    reasons.append(
                        f"model {name!r} is high-stakes: version {version} needs an approval "
                        "from a user with the 'approver' role (carrara models approve "
                        f"{name} {version})"
                    )
                elif decisions[-1][2] != "approved":
                    who, why = decisions[-1][0], decisions[-1][1]
                    reasons.append(
                        f"model {name!r} is high-stakes: version {version} was rejected by "
                        f"{who!r}: {why!r}; it needs a new approval from a user with the "
                        f"'approver' role (carrara models approve {name} {version})"
                    )
            if reasons:
                self._audit(
                    tx,
                    model[0],
                    v.version_id,
                    actor,
                    "version.promote_refused",
                    {
                        "version": version,
                        "reasons": reasons,
                        "gates": [msgspec.to_builtins(r) for r in results],
                    },
                )
                refused = FailedPreconditionError(
                    f"promotion of model {name!r} version {version} refused: " + "; ".join(reasons)
                )
            else:
                entries: list[tuple[int | None, Mapping[str, Any]]] = []
                if prod is not None:
                    # Archive first: the partial unique index allows one PRODUCTION row.
                    tx.execute(
                        "UPDATE model_versions SET status = 'ARCHIVED', archived_at = ?"
                        " WHERE version_id = ?",
                        (now, prod.version_id),
                    )
                    archived = prod.version
                    entries.append(
                        (
                            prod.version_id,
                            {
                                "version": prod.version,
                                "from": "PRODUCTION",
                                "to": "ARCHIVED",
                                "replaced_by": version,
                            },
                        )
                    )
                tx.execute(
                    "UPDATE model_versions SET status = 'PRODUCTION', promoted_at = ?,"
                    " promoted_by = ? WHERE version_id = ?",
                    (now, actor.subject, v.version_id),
                )
                entries.append(
                    (
                        v.version_id,
                        {
                            "version": version,
                            "from": "STAGING",
                            "to": "PRODUCTION",
                            "gates": [msgspec.to_builtins(r) for r in results],
                            "approvers": approvers,
                        },
                    )
                )
                self._audit_many(tx, model[0], actor, "version.status", entries)
        if refused is not None:
            raise refused
        promoted = msgspec.structs.replace(
            v, status="PRODUCTION", promoted_at=now, promoted_by=actor.subject
        )
        return PromotionResult(version=promoted, archived_version=archived, gate_results=results)

    def _run_evaluator(self, name: str, version: int, actor: Principal) -> None:
        if self.evaluator is None:
            return
        model = self.get_model(name)
        v = self.get_version(name, version)
        for ds in dict.fromkeys(g.dataset for g in model.gates):
            needed = {g.metric for g in model.gates if g.dataset == ds}
            if not needed <= set(v.evaluations.get(ds, {})):
                self._record_evaluation(name, version, ds, self.evaluator(v, ds), actor)

    def gate_results(self, name: str, version: int) -> list[GateResult]:
        """Every gate check run for a version (passed or not), oldest first."""
        with self.db.transaction() as tx:
            v = version_row(tx, model_row(tx, name), version)
            rows = tx.fetchall(
                "SELECT gate, dataset, metric, value, reference, passed, detail FROM gate_results"
                " WHERE version_id = ? ORDER BY gate_result_id",
                (v[0],),
            )
        return [
            GateResult(
                gate=r[0],
                dataset=r[1],
                metric=r[2],
                value=r[3],
                reference=r[4],
                passed=bool(r[5]),
                detail=r[6],
            )
            for r in rows
        ]

    def archive(self, name: str, version: int, *, actor: Principal) -> ModelVersion:
        """Retire a version; refused while the active deployment still routes to it."""
        require_role(actor, "deployer", "archiving a version")
        with self.db.transaction() as tx:
            model = model_row(tx, name, lock=True)
            v = version_from_row(version_row(tx, model, version))
            if v.status == "ARCHIVED":
                raise FailedPreconditionError(
                    f"model {name!r} version {version} is already archived"
                )
            active = active_in(tx, model[0])
            if active is not None and version in split_versions(active.traffic_split):
                raise FailedPreconditionError(
                    f"model {name!r} version {version} is in active deployment "
                    f"#{active.deployment_id}; deploy without it first"
                )
            tx.execute(
                "UPDATE model_versions SET status = 'ARCHIVED', archived_at = ?"
                " WHERE version_id = ?",
                (now_iso(), v.version_id),
            )
            self._audit(
                tx,
                model[0],
                v.version_id,
                actor,
                "version.status",
                {"version": version, "from": v.status, "to": "ARCHIVED"},
            )
        return self.get_version(name, version)
