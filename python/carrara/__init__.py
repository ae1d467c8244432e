"""Carrara: one ML platform from features to serving.

The kernel (``errors``, ``config``, ``types``) is importable without the native module;
``carrara.core`` exposes the C++ serving core.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from carrara.errors import (
    CarraraError,
    DecodeError,
    InvalidArgumentError,
    NotFoundError,
)

try:
    __version__ = version("carrara")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CarraraError",
    "DecodeError",
    "InvalidArgumentError",
    "NotFoundError",
    "__version__",
]
