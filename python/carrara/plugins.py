"""Store plug-ins: one resolver for every store kind (database, online store, event log,
offline engine), so no part chains ``if url.startswith(...)``.

A :class:`StoreKind` is the kind's interface plus a table from scheme (or engine name) to
factory. The module that implements a built-in backend registers it; a factory given as
``"package.module:attr"`` is imported on first use only, so naming a backend never imports
another one's dependencies (the gateway never imports DuckDB). Any other backend is named by
the class path of a subclass of the interface, ``package.module:ClassName`` or
``package.module.ClassName``, in place of the scheme (``mypkg.stores:MyStore://host/0``) or
as the whole value (``offline_engine = "mypkg.spark:SparkOfflineStore"``); it is built by
the interface's ``from_url`` classmethod. (Feast's ``*_STORE_CLASS_FOR_TYPE`` and class path
``type:`` settings.)
"""

from __future__ import annotations

import importlib
import inspect
import re
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from carrara.errors import ConfigError

__all__ = ["CLASS_PATH_FORM", "StoreKind", "is_class_path", "load_class_path"]

T = TypeVar("T")

#: How a plug-in class is named in settings (for messages).
CLASS_PATH_FORM = "package.module:ClassName (or package.module.ClassName)"

_CLASS_PATH = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r"(:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r"|\.[A-Za-z_][A-Za-z0-9_]*)$"
)


def is_class_path(text: str) -> bool:
    """``pkg.mod:Name`` or ``pkg.mod.Name`` (a built-in scheme or engine name has neither
    a dot nor a colon)."""
    return bool(_CLASS_PATH.match(text))


def load_class_path(path: str, what: str) -> Any:
    """The object ``path`` names (``module:attr.attr`` or ``module.attr``); a ConfigError
    says which part failed to import or resolve."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ConfigError(f"{what} class path {path!r} is not of the form {CLASS_PATH_FORM}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{what} class path {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ConfigError(
                f"{what} class path {path!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    return obj


class StoreKind(Generic[T]):
    """One store kind: its interface and its backends by scheme (or engine name).

    ``name`` (``"online store"``) and ``examples`` (``"memory:// or redis://host:port/db"``)
    go into error messages; ``key`` says what selects a backend (``"URL"`` for URL kinds,
    whose key is the scheme, or ``"engine"``)."""

    def __init__(
        self, name: str, interface: type[object], *, examples: str, key: str = "URL"
    ) -> None:
        # ``interface`` is the class ``T`` itself (``type[T]`` would refuse an abstract one).
        self.name = name
        self.interface = interface
        self.examples = examples
        self.key = key
        self._factories: dict[str, Callable[..., T] | str] = {}
        self._lock = threading.Lock()

    def register(self, key: str, factory: Callable[..., T] | str) -> None:
        """Back ``key`` (a scheme or engine name) by ``factory``: a callable taking the URL
        (plus the kind's keyword options), a subclass of the interface (built by its
        ``from_url``) or the ``module:attr`` path of either, imported on first use."""
        if is_class_path(key) or not key:
            raise ValueError(f"a {self.name} scheme has no dots or colons: {key!r}")
        with self._lock:
            self._factories[key] = factory

    def known(self) -> list[str]:
        """The registered schemes (engine names), sorted."""
        return sorted(self._factories)

    def resolve(self, key: str) -> Callable[..., T]:
        """The factory of a registered scheme (engine name) or a plug-in class path."""
        factory = self._factories.get(key)
        if factory is None:
            if not is_class_path(key):
                raise ConfigError(self._unknown(key))
            return self._from_class(load_class_path(key, self.name), key)
        if isinstance(factory, str):
            factory = self._from_class(load_class_path(factory, self.name), factory)
            with self._lock:
                self._factories[key] = factory
        return factory

    def open(self, url: str, **options: Any) -> T:
        """Open the backend ``url`` names by its scheme, or by a class path in place of the
        scheme (or as the whole value); the factory gets the full URL and ``options``."""
        head, sep, _ = url.partition("://")
        if sep:
            key = head
        elif is_class_path(url):
            key = url
        else:
            key = urlsplit(url).scheme
        if key not in self._factories and not is_class_path(key):
            raise ConfigError(self._unknown(url))
        factory = self.resolve(key)
        return factory(url, **options)

    def _from_class(self, obj: Any, path: str) -> Callable[..., T]:
        iface = f"{self.interface.__module__}.{self.interface.__qualname__}"
        if not inspect.isclass(obj):
            if callable(obj):
                factory: Callable[..., T] = obj
                return factory
            raise ConfigError(f"{self.name} class path {path!r} names {obj!r}, not a class")
        if not issubclass(obj, self.interface):
            raise ConfigError(
                f"{self.name} class path {path!r}: {obj.__qualname__} does not implement the "
                f"{self.name} interface (subclass {iface})"
            )
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            raise ConfigError(
                f"{self.name} class path {path!r}: {obj.__qualname__} does not implement the "
                f"{self.name} interface {iface}: abstract method(s) {missing}"
            )
        from_url: Callable[..., T] | None = getattr(obj, "from_url", None)
        if not callable(from_url):
            raise ConfigError(
                f"{self.name} class path {path!r}: {obj.__qualname__} has no from_url classmethod"
            )
        return from_url

    def _unknown(self, value: str) -> str:
        what = "scheme" if self.key == "URL" else self.key
        return (
            f"unsupported {self.name} {self.key} {value!r}; known {what}s: "
            f"{', '.join(self.known())} (e.g. {self.examples}), or a plug-in class path "
            f"{CLASS_PATH_FORM} of a subclass of "
            f"{self.interface.__module__}.{self.interface.__qualname__}"
            + (" in place of the scheme" if self.key == "URL" else "")
        )
