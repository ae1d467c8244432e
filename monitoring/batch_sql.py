"""Batched SQL over both dialects: set-membership checks and insert-if-new with RETURNING.

PostgreSQL gets one array per column (``= ANY(?)``, ``unnest``): a constant query text that
psycopg parses once, whatever the batch size. SQLite gets ``IN (...)`` / multi-row VALUES in
chunks under its parameter limit.
"""

from __future__ import annotations

from typing import Any

from carrara.sql import Transaction

__all__ = ["existing_ids", "insert_returning", "rows_matching"]


def rows_matching(tx: Transaction, select: str, ids: list[str]) -> list[tuple[Any, ...]]:
    """Rows of ``select`` (no WHERE clause) whose ``request_id`` is in ``ids``."""
    if not ids:
        return []
    if tx.dialect == "postgresql":
        return tx.fetchall(f"{select} WHERE request_id = ANY(?)", [ids])
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        out += tx.fetchall(f"{select} WHERE request_id IN ({','.join('?' * len(chunk))})", chunk)
    return out


def existing_ids(tx: Transaction, table: str, ids: list[str]) -> set[str]:
    """The request ids among ``ids`` that ``table`` holds."""
    return {str(r[0]) for r in rows_matching(tx, f"SELECT request_id FROM {table}", ids)}


def insert_returning(
    tx: Transaction, sql: str, rows: list[tuple[Any, ...]], pg_types: tuple[str, ...]
) -> set[str]:
    """Run ``sql`` (with ``{source}`` for the rows) and collect the first returned column.
    PostgreSQL gets one array per column (``unnest``): a constant query text, parsed once;
    SQLite gets multi-row VALUES in chunks."""
    out: set[str] = set()
    if not rows:
        return out
    if tx.dialect == "postgresql":
        casts = ", ".join(f"?::{t}[]" for t in pg_types)
        columns = [list(c) for c in zip(*rows, strict=True)]
        found = tx.fetchall(sql.format(source=f"SELECT * FROM unnest({casts})"), columns)
        return {str(r[0]) for r in found}
    width = len(rows[0])
    one = "(" + ", ".join("?" * width) + ")"
    for i in range(0, len(rows), 400):
        chunk = rows[i : i + 400]
        params = [v for row in chunk for v in row]
        found = tx.fetchall(sql.format(source="VALUES " + ",".join([one] * len(chunk))), params)
        out.update(str(r[0]) for r in found)
    return out
