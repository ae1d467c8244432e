"""Bearer tokens with roles, stored hashed in the registry database.

Tokens are 32 random bytes (``crt_`` + urlsafe base64); only their sha256 is stored, so a
database dump reveals none. The roles, :class:`Principal` and :func:`require_role` are the
kernel's (``carrara.auth``, re-exported here); :func:`registry_authenticator` is what every API
of ``carrara up`` checks tokens with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from typing import Any

import msgspec

from carrara.auth import ROLES, Authenticator, Principal, require_role
from carrara.errors import InvalidArgumentError, UnauthenticatedError
from carrara.registry.util import now_iso
from carrara.sql import Database, Transaction

__all__ = [
    "ROLES",
    "Principal",
    "TokenInfo",
    "TokenStore",
    "registry_authenticator",
    "require_role",
]


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A token as listed (never its secret)."""

    token_id: int
    subject: str
    roles: list[str]
    created_at: str
    revoked_at: str | None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _audit(tx: Transaction, action: str, detail: dict[str, Any]) -> None:
    # Token changes are made with direct database access, so the actor is the DB admin.
    tx.execute(
        "INSERT INTO audit_log (actor, action, detail_json, created_at) VALUES (?, ?, ?, ?)",
        ("db-admin", action, json.dumps(detail, sort_keys=True), now_iso()),
    )


class TokenStore:
    """Create, check and revoke API tokens in the registry database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, subject: str, roles: Iterable[str]) -> str:
        """A new token for ``subject``; the plaintext is returned once and never stored."""
        roles = sorted(set(roles))
        unknown = [r for r in roles if r not in ROLES]
        if not subject:
            raise InvalidArgumentError("a token needs a subject (the user or service it is for)")
        if unknown or not roles:
            raise InvalidArgumentError(
                f"unknown role(s) {unknown or '(none given)'}; known: {', '.join(ROLES)}"
            )
        token = "crt_" + secrets.token_urlsafe(32)
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO api_tokens (subject, token_sha256, roles, created_at)"
                " VALUES (?, ?, ?, ?)",
                (subject, _hash(token), ",".join(roles), now_iso()),
            )
            _audit(tx, "token.create", {"subject": subject, "roles": roles})
        return token

    def authenticate(self, token: str) -> Principal:
        """The principal a token belongs to; 401 if it is unknown or revoked."""
        with self._db.transaction() as tx:
            row = tx.fetchone(
                "SELECT subject, roles, revoked_at FROM api_tokens WHERE token_sha256 = ?",
                (_hash(token),),
            )
        if row is None:
            raise UnauthenticatedError("unknown bearer token; ask an admin for a valid one")
        if row[2] is not None:
            raise UnauthenticatedError(f"the token of {row[0]!r} was revoked at {row[2]}")
        return Principal(row[0], frozenset(r for r in row[1].split(",") if r))

    def revoke(self, token_id: int) -> None:
        with self._db.transaction() as tx:
            cur = tx.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (now_iso(), token_id),
            )
            if cur.rowcount == 0:
                raise InvalidArgumentError(f"no active token with id {token_id}")
            _audit(tx, "token.revoke", {"token_id": token_id})

    def list(self) -> list[TokenInfo]:
        with self._db.transaction() as tx:
            rows = tx.fetchall(
                "SELECT token_id, subject, roles, created_at, revoked_at FROM api_tokens"
                " ORDER BY token_id"
            )
        return [
            TokenInfo(
                token_id=r[0],
                subject=r[1],
                roles=r[2].split(","),
                created_at=r[3],
                revoked_at=r[4],
            )
            for r in rows
        ]


def registry_authenticator(store: TokenStore, bootstrap_token: str | None = None) -> Authenticator:
    """Tokens as the registry checks them: ``bootstrap_token`` (e.g. ``Settings.api_token``,
    compared in constant time) is an admin, so the first real tokens can be created remotely;
    any other token is looked up (hashed) in ``store``."""
    bootstrap = bootstrap_token.encode() if bootstrap_token else b""

    def authenticate(token: str) -> Principal:
        if bootstrap and hmac.compare_digest(token.encode(), bootstrap):
            return Principal("bootstrap", frozenset({"admin"}))
        return store.authenticate(token)

    return authenticate
