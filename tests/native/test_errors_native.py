"""Every native error code maps to its carrara.errors class through the binding."""

from __future__ import annotations

import pytest

from carrara import _native, errors

EXPECTED = {
    "INVALID_ARGUMENT": errors.InvalidArgumentError,
    "NOT_FOUND": errors.NotFoundError,
    "DECODE": errors.DecodeError,
    "RESOURCE_EXHAUSTED": errors.ResourceExhaustedError,
    "FAILED_PRECONDITION": errors.FailedPreconditionError,
    "INTERNAL": errors.InternalError,
    "CANCELLED": errors.CancelledError,
    "DEADLINE_EXCEEDED": errors.DeadlineExceededError,
    "UNAVAILABLE": errors.UnavailableError,
}


def test_code_table_matches_python() -> None:
    codes = dict(_native.ERROR_CODES)
    assert codes.pop("OK") == 0
    assert set(codes) == set(EXPECTED), "a native code has no Python class (or vice versa)"
    for name, code in codes.items():
        assert errors.CODES[code] is EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_code_raises_its_class(name: str) -> None:
    code = _native.ERROR_CODES[name]
    with pytest.raises(EXPECTED[name], match=f"boom {name}") as info:
        _native._raise_error(code, f"boom {name}")
    assert type(info.value) is EXPECTED[name]
    assert isinstance(info.value, errors.CarraraError)
