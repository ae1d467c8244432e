"""Carrara: one ML platform from features to serving.

The kernel (``errors``, ``config``, ``types``) is importable without the native module;
``carrara.core`` exposes the C++ serving core.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from carrara.errors import (
    CarraraError,
    DecodeError,
    InvalidArgumentError,
    NotFoundError,
)

if TYPE_CHECKING:
    from carrara.client import Client
    from carrara.platform import Platform

try:
    __version__ = version("carrara")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CarraraError",
    "Client",
    "DecodeError",
    "InvalidArgumentError",
    "NotFoundError",
    "Platform",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # ``Platform`` is imported on first use, so ``import carrara`` (and ``carrara --help``)
    # does not load the parts.
    if name == "Platform":
        from carrara.platform import Platform

        return Platform
    if name == "Client":  # the remote twin of Platform, imported on first use as well
        from carrara.client import Client

        return Client
    raise AttributeError(f"module 'carrara' has no attribute {name!r}")
