"""The exception hierarchy and the native error-code table."""

from __future__ import annotations

import pytest

import carrara
from carrara import errors


def test_every_error_is_a_carrara_error_and_its_builtin() -> None:
    assert issubclass(errors.DecodeError, errors.InvalidArgumentError)
    assert issubclass(errors.DecodeError, ValueError)
    assert issubclass(errors.NotFoundError, LookupError)
    assert issubclass(errors.DeadlineExceededError, TimeoutError)
    assert issubclass(errors.UnavailableError, ConnectionError)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.CarraraError), name


def test_http_status_of_client_errors_is_4xx() -> None:
    assert errors.InvalidArgumentError.http_status == 400
    assert errors.UnauthenticatedError.http_status == 401
    assert errors.PermissionDeniedError.http_status == 403
    assert errors.NotFoundError.http_status == 404
    assert errors.ResourceExhaustedError.http_status == 429
    assert errors.InternalError.http_status == 500


def test_top_level_reexports() -> None:
    assert carrara.CarraraError is errors.CarraraError
    assert carrara.DecodeError is errors.DecodeError


@pytest.mark.parametrize("code", [-1, 0, 99])
def test_unknown_codes_are_internal(code: int) -> None:
    assert errors.error_for_code(code) is errors.InternalError
