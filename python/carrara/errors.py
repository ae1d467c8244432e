"""Carrara's one exception hierarchy, shared by the Python services and the native core.

Each class also inherits the builtin it resembles, so ``except ValueError`` keeps working.
``CODES`` pairs the native core's numeric error codes with these classes; the binding
(``cpp/_native.cpp``) raises through the same table. ``GRPC_CODES`` is the reverse of each
class's ``grpc_code``: what a client raises for a service's ``{"error": CODE, "message"}``.
"""

from __future__ import annotations

__all__ = [
    "CODES",
    "AlreadyExistsError",
    "CancelledError",
    "CarraraError",
    "ConfigError",
    "DecodeError",
    "DeadlineExceededError",
    "GRPC_CODES",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for_code",
    "error_for_response",
]


class CarraraError(Exception):
    """Base of every error Carrara raises on purpose."""

    #: HTTP status a service answers with for this error.
    http_status: int = 500
    #: gRPC status code name for this error.
    grpc_code: str = "UNKNOWN"


class InvalidArgumentError(CarraraError, ValueError):
    """The caller sent something that can never work (bad spec, wrong shape, unknown name)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class DecodeError(InvalidArgumentError):
    """Bytes that do not parse as the expected message."""


class ConfigError(InvalidArgumentError):
    """A configuration value (file or ``CARRARA_*`` variable) is invalid."""


class NotFoundError(CarraraError, LookupError):
    """A named thing (model, version, feature group, entity) does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class AlreadyExistsError(CarraraError, ValueError):
    """Creating something whose name or id is taken."""

    http_status = 409
    grpc_code = "ALREADY_EXISTS"


class FailedPreconditionError(CarraraError, RuntimeError):
    """The system is not in a state where this call can succeed (e.g. a gate failed)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class ResourceExhaustedError(CarraraError, RuntimeError):
    """Over a limit: load shedding, batch size, quota."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class PayloadTooLargeError(ResourceExhaustedError):
    """A request body over the limit of the API that received it (HTTP 413 in every API)."""

    http_status = 413


class UnauthenticatedError(CarraraError, PermissionError):
    """No or unknown credentials."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(CarraraError, PermissionError):
    """Known caller without the role the call needs."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class CancelledError(CarraraError):
    """The operation was cancelled by its caller."""

    http_status = 499
    grpc_code = "CANCELLED"


class DeadlineExceededError(CarraraError, TimeoutError):
    """The operation did not finish within its deadline."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class UnavailableError(CarraraError, ConnectionError):
    """A dependency (store, backend) cannot be reached right now; retrying may work."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class InternalError(CarraraError, RuntimeError):
    """A bug: an invariant of Carrara itself broke."""

    http_status = 500
    grpc_code = "INTERNAL"


#: Native error code (core/include/carrara/core/error.hpp) -> exception class.
CODES: dict[int, type[CarraraError]] = {
    1: InvalidArgumentError,
    2: NotFoundError,
    3: DecodeError,
    4: ResourceExhaustedError,
    5: FailedPreconditionError,
    6: InternalError,
    7: CancelledError,
    8: DeadlineExceededError,
    9: UnavailableError,
}


def error_for_code(code: int) -> type[CarraraError]:
    """The exception class for a native error code; unknown codes are internal errors."""
    return CODES.get(code, InternalError)


def _hierarchy(root: type[CarraraError]) -> list[type[CarraraError]]:
    """Every class under ``root`` defined so far (this module's), parents before children."""
    out: list[type[CarraraError]] = []
    for cls in root.__subclasses__():
        out += [cls, *_hierarchy(cls)]
    return out


#: gRPC code name -> the class that declares it (``DecodeError`` and ``ConfigError`` only
#: inherit ``INVALID_ARGUMENT``, so a remote one comes back as ``InvalidArgumentError``).
GRPC_CODES: dict[str, type[CarraraError]] = {
    cls.grpc_code: cls for cls in _hierarchy(CarraraError) if "grpc_code" in vars(cls)
}
#: (gRPC code, HTTP status) -> a subclass that answers with a status of its own
#: (``PayloadTooLargeError``: ``RESOURCE_EXHAUSTED`` with 413, not 429).
_BY_CODE_AND_STATUS: dict[tuple[str, int], type[CarraraError]] = {
    (cls.grpc_code, cls.http_status): cls
    for cls in _hierarchy(CarraraError)
    if "http_status" in vars(cls) and "grpc_code" not in vars(cls)
}
_statuses = [cls.http_status for cls in GRPC_CODES.values()]
#: HTTP status -> class, for bodies without a known code (a proxy's HTML page, KServe's
#: ``{"error": "message"}``); statuses two classes share (409) are left out.
_BY_STATUS: dict[int, type[CarraraError]] = {
    cls.http_status: cls for cls in GRPC_CODES.values() if _statuses.count(cls.http_status) == 1
}
_BY_STATUS.update({status: cls for (_, status), cls in _BY_CODE_AND_STATUS.items()})
del _statuses


def error_for_response(code: str | None, status: int) -> type[CarraraError]:
    """The class a service's error answer stands for: by its gRPC ``code`` (refined by the
    HTTP ``status``), else by the status alone; anything else is an internal error."""
    if code in GRPC_CODES:
        return _BY_CODE_AND_STATUS.get((code, status), GRPC_CODES[code])
    return _BY_STATUS.get(status, InternalError)
