"""Optional authentication on the gateway's predict fronts: bearer tokens and TLS.

Off by default: the gateway listens on loopback for the embedded / single-machine case, where
anything that can reach the port is already trusted. Turned on (``auth:`` in the gateway YAML
for ``carrara serve``; ``CARRARA_GATEWAY_TOKEN`` / ``CARRARA_GATEWAY_TLS_CERT`` /
``CARRARA_GATEWAY_TLS_KEY`` for ``carrara up``), it covers both fronts:

- gRPC (native, ``server/``): every RPC of ``carrara.v1.Predict`` and of the KServe v2
  ``GRPCInferenceService`` needs the metadata ``authorization: Bearer <token>``, checked in C++
  before the request is parsed; ``grpc.health.v1.Health`` stays open (probes).
- HTTP: every route needs the header ``Authorization: Bearer <token>`` except the operational
  ones in ``OPEN_PATHS`` (``/healthz``, ``/readyz``, ``/metrics``: probes and scrapes); a
  refusal is 401 with the usual ``{"error": "UNAUTHENTICATED", "message"}`` (Triton's
  ``{"error": "message"}`` under ``/v2``).
- TLS: the same certificate and key on both ports (TLS only, no plaintext beside it); with a
  client CA, clients must also present a certificate it signed (mutual TLS).

Tokens are compared in constant time and never logged, echoed or shown in a ``repr``.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from carrara.auth import bearer_token
from carrara.errors import ConfigError, UnauthenticatedError

__all__ = ["OPEN_PATHS", "BearerAuthMiddleware", "FrontAuth", "read_tokens_file"]

#: HTTP paths served without a token when tokens are configured (exact matches).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def read_tokens_file(path: str | Path) -> tuple[str, ...]:
    """Tokens, one a line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the gateway tokens file {path}: {exc.strerror}") from exc
    tokens = tuple(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ConfigError(f"the gateway tokens file {path} holds no token")
    return tokens


def _read_pem(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the gateway {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class FrontAuth:
    """What both fronts check: accepted bearer tokens (none: no token check) and TLS files
    (PEM paths; none: plaintext). An instance with neither changes nothing."""

    tokens: tuple[str, ...] = field(default=(), repr=False)  # never shown
    tls_cert: str | None = None  # certificate chain, PEM
    tls_key: str | None = None  # its private key, PEM
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates it signed

    def __post_init__(self) -> None:
        if any(not t or t != t.strip() for t in self.tokens):
            raise ConfigError("gateway tokens must be non-empty, without surrounding whitespace")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("gateway TLS needs both a certificate (tls_cert) and a key (tls_key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("gateway tls_client_ca needs TLS: set tls_cert and tls_key")

    @classmethod
    def build(
        cls,
        *,
        tokens: Iterable[str] = (),
        tokens_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
    ) -> FrontAuth:
        all_tokens = [t.strip() for t in tokens if t.strip()]
        if tokens_file:
            all_tokens += read_tokens_file(tokens_file)
        return cls(
            tokens=tuple(dict.fromkeys(all_tokens)),
            tls_cert=tls_cert or None,
            tls_key=tls_key or None,
            tls_client_ca=tls_client_ca or None,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.tls

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def describe(self) -> str:
        """For start-up lines and logs; no secret in it."""
        parts = []
        if self.tokens:
            parts.append(f"bearer tokens ({len(self.tokens)})")
        if self.tls:
            parts.append("mutual TLS" if self.tls_client_ca else "TLS")
        return ", ".join(parts) or "no auth"

    def grpc_options(self) -> dict[str, Any]:
        """Keyword arguments of ``_native.GrpcServer`` (PEM contents, read now)."""
        options: dict[str, Any] = {"auth_tokens": list(self.tokens)}
        if self.tls_cert and self.tls_key:
            options["tls_cert_chain"] = _read_pem(self.tls_cert, "TLS certificate")
            options["tls_private_key"] = _read_pem(self.tls_key, "TLS key")
        if self.tls_client_ca:
            options["tls_client_ca"] = _read_pem(self.tls_client_ca, "TLS client CA")
        return options

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of ``uvicorn.Config`` for TLS (empty without it)."""
        if not self.tls:
            return {}
        options: dict[str, Any] = {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}
        if self.tls_client_ca:
            options["ssl_ca_certs"] = self.tls_client_ca
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options


_encoder = msgspec.json.Encoder()


def _refusal(path: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 401 in the shape of the route family: Triton's under ``/v2``, Carrara's elsewhere."""
    kserve = path == "/v2" or path.startswith("/v2/")
    error = {"error": message} if kserve else {"error": "UNAUTHENTICATED", "message": message}
    body = _encoder.encode(error)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="carrara"'),
    ]
    return headers, body


def check_bearer(value: bytes | None, tokens: Iterable[bytes]) -> str | None:
    """None when ``value`` (an Authorization header) is ``Bearer <one of tokens>``; else why
    not. Every token is compared (in constant time), whichever matches."""
    try:
        token = bearer_token(value.decode("latin-1")) if value is not None else None
    except UnauthenticatedError as exc:
        return str(exc)
    if token is None:
        return "this gateway requires a bearer token: send 'Authorization: Bearer <token>'"
    presented = token.encode("latin-1")
    match = False
    for accepted in tokens:
        match |= hmac.compare_digest(presented, accepted)
    return None if match else "the bearer token is not accepted"


class BearerAuthMiddleware:
    """ASGI middleware: HTTP requests outside ``open_paths`` need an accepted bearer token,
    else 401 before the app (and the request body) is touched."""

    def __init__(
        self, app: ASGIApp, tokens: Iterable[str], open_paths: Iterable[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self._tokens = tuple(t.encode() for t in tokens)
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._tokens or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        headers: Mapping[bytes, bytes] = dict(scope["headers"])
        why = check_bearer(headers.get(b"authorization"), self._tokens)
        if why is None:
            await self.app(scope, receive, send)
            return
        response_headers, body = _refusal(scope["path"], why)
        await send({"type": "http.response.start", "status": 401, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})
