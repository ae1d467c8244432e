"""The registry's audit log: who did what to which model or version, written in the same
transaction as the change it records, and read back oldest first."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from carrara.registry.auth import Principal
from carrara.registry.records import model_row
from carrara.registry.types import AuditEntry
from carrara.registry.util import now_iso
from carrara.sql import Database, Transaction

__all__ = ["AuditMixin"]

_INSERT = "INSERT INTO audit_log (model_id, version_id, actor, action, detail_json, created_at)"


class AuditMixin:
    """Writes and reads ``audit_log`` rows; every other registry concern builds on it."""

    db: Database

    def _audit(
        self,
        tx: Transaction,
        model_id: int | None,
        version_id: int | None,
        actor: Principal,
        action: str,
        detail: Mapping[str, Any],
    ) -> None:
        tx.execute(
            _INSERT + " VALUES (?, ?, ?, ?, ?, ?)",
            (
                model_id,
                version_id,
                actor.subject,
                action,
                json.dumps(detail, sort_keys=True),
                now_iso(),
            ),
        )

    def _audit_many(
        self,
        tx: Transaction,
        model_id: int,
        actor: Principal,
        action: str,
        entries: Sequence[tuple[int | None, Mapping[str, Any]]],
    ) -> None:
        # One multi-row INSERT: fewer round trips on the promotion path.
        now = now_iso()
        tx.execute(
            _INSERT + " VALUES " + ", ".join("(?, ?, ?, ?, ?, ?)" for _ in entries),
            [
                x
                for version_id, detail in entries
                for x in (
                    model_id,
                    version_id,
                    actor.subject,
                    action,
                    json.dumps(detail, sort_keys=True),
                    now,
                )
            ],
        )

    def audit(self, name: str | None = None, *, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries, oldest first, for one model or for everything."""
        with self.db.transaction() as tx:
            sql = (
                "SELECT a.audit_id, m.name, v.version_number, a.actor, a.action, a.detail_json,"
                " a.created_at FROM audit_log a LEFT JOIN models m ON m.model_id = a.model_id"
                " LEFT JOIN model_versions v ON v.version_id = a.version_id"
            )
            params: list[Any] = []
            if name is not None:
                sql += " WHERE a.model_id = ?"
                params.append(model_row(tx, name)[0])
            rows = tx.fetchall(sql + " ORDER BY a.audit_id LIMIT ?", [*params, limit])
        return [
            AuditEntry(
                audit_id=r[0],
                model=r[1],
                version=r[2],
                actor=r[3],
                action=r[4],
                detail=json.loads(r[5]),
                created_at=r[6],
            )
            for r in rows
        ]
