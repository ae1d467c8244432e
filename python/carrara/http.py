"""What every part's HTTP API shares: the error body, JSON responses, the handler wrapper that
maps :class:`CarraraError` to its status, and bearer-token authorization.

Every error is ``{"error": <gRPC code name>, "message": ...}`` with the error's
``http_status``, so one client (``carrara.Client``) reads errors from every part the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from carrara.errors import CarraraError, UnauthenticatedError

if TYPE_CHECKING:
    from carrara.registry.auth import Principal

__all__ = ["ErrorBody", "Handler", "authorize", "error_response", "json_response", "wrap"]

Handler = Callable[[Request], Awaitable[Response]]


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error response: the gRPC-style code and a message saying how to fix it."""

    error: str
    message: str


_ENCODER = msgspec.json.Encoder()


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_ENCODER.encode(value), status_code=status, media_type="application/json")


def error_response(exc: CarraraError) -> Response:
    return json_response(ErrorBody(exc.grpc_code, str(exc)), exc.http_status)


def wrap(handler: Handler) -> Handler:
    """``handler`` with every CarraraError answered as its status (never a traceback)."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except CarraraError as exc:
            return error_response(exc)

    run.__name__ = handler.__name__
    return run


def authorize(
    request: Request, tokens: Mapping[str, Principal] | None, role: str, action: str
) -> Principal | None:
    """The caller's principal when it may do ``action`` (None when ``tokens`` is None: open).

    ``tokens`` is looked up, never listed, so a mapping that resolves tokens stored in the
    registry database serves as well as a dict."""
    from carrara.registry.auth import require_role  # roles are the registry's

    if tokens is None:
        return None
    header = request.headers.get("authorization", "")
    principal = None
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("the Authorization header must be 'Bearer <token>'")
        principal = tokens.get(token.strip())
        if principal is None:
            raise UnauthenticatedError("unknown bearer token; ask an admin for a valid one")
    return require_role(principal, role, action)
