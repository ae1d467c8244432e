"""Who is calling: principals with roles, the role check, and the one bearer-header parser.

Every part's API checks writes the same way: :func:`bearer_token` reads the
``Authorization: Bearer <token>`` header, an :data:`Authenticator` turns the token into a
:class:`Principal` (the registry's resolves stored tokens; tests and single-user setups pass a
fixed table, :func:`authenticator`), and :func:`require_role` answers 401 or 403 with what is
missing. Roles: ``reader``, ``publisher`` (register, write features, submit jobs),
``deployer`` (promote, deploy, rollback, archive), ``approver`` (approve high-stakes
promotions) and ``admin`` (everything except approving: approval stays a separate person's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from carrara.errors import PermissionDeniedError, UnauthenticatedError

__all__ = [
    "ROLES",
    "Authenticator",
    "Principal",
    "authenticator",
    "bearer_token",
    "require_role",
]

ROLES = ("reader", "publisher", "deployer", "approver", "admin")
_IMPLIED = {"admin": {"reader", "publisher", "deployer", "admin"}}


class Principal(msgspec.Struct, frozen=True):
    """Who is calling and with which roles."""

    subject: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles or any(role in _IMPLIED.get(r, ()) for r in self.roles)


#: A bearer token's principal; raises UnauthenticatedError for a token it does not know.
Authenticator = Callable[[str], Principal]


def authenticator(tokens: Mapping[str, Principal] | Authenticator) -> Authenticator:
    """``tokens`` as an :data:`Authenticator`: a mapping (a fixed table of tokens) is looked
    up, never listed; a callable is returned as it is."""
    if not isinstance(tokens, Mapping):
        return tokens
    table = tokens

    def lookup(token: str) -> Principal:
        principal = table.get(token)
        if principal is None:
            raise UnauthenticatedError("unknown bearer token; ask an admin for a valid one")
        return principal

    return lookup


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization`` header value: None when the header is absent or
    empty, UnauthenticatedError when it is not ``Bearer <token>``."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthenticatedError("the Authorization header must be 'Bearer <token>'")
    return token


def require_role(principal: Principal | None, role: str, action: str) -> Principal:
    """The principal if it may do ``action``; else the 401/403 error that says what is missing."""
    if principal is None:
        raise UnauthenticatedError(
            f"{action} needs a bearer token with role {role!r}: send 'Authorization: Bearer "
            "<token>' (create one with 'carrara models token create')"
        )
    if not principal.has(role):
        have = ", ".join(sorted(principal.roles)) or "none"
        raise PermissionDeniedError(
            f"{action} needs role {role!r}; token of {principal.subject!r} has roles: {have}"
        )
    return principal
