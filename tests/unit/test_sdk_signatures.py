"""One contract per part: each remote SDK class takes exactly the arguments of its embedded twin.

``inspect.signature`` of every public method is compared, parameter by parameter (name, kind,
default, annotation as written), so ``actor=p.actor`` or a keyword written against
``carrara.Platform`` cannot be a ``TypeError`` against ``carrara.Client``. Every public method
of the remote class exists locally with an equal signature; every public method of the local
class exists remotely unless ``LOCAL_ONLY`` says why it cannot.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from carrara.client import Client, RemoteFeatures, RemoteMonitor, RemoteTraining
from carrara.feature_cache.service import FeatureService
from carrara.platform import Monitor, Platform, Training
from carrara.registry.client import RegistryClient
from carrara.registry.registry import ModelRegistry

#: Local-only public methods, each with the reason it has no remote twin.
LOCAL_ONLY: dict[type, dict[str, str]] = {
    ModelRegistry: {
        "open": "constructor over a database URL; RegistryClient(url, token) is the remote one",
        "publish_pending": "outbox internals: the API process publishes as it records",
    },
    FeatureService: {
        "open": "constructor over store URLs",
        "from_settings": "constructor over Settings",
    },
    Monitor: {"consumer": "the in-process consumer; `carrara up` runs it as a process"},
    Platform: {
        "local": "constructor of the embedded platform; Client(url, token) is the remote one",
        "open": "constructor of the embedded platform from Settings",
    },
}

PAIRS = [
    (ModelRegistry, RegistryClient),
    (FeatureService, RemoteFeatures),
    (Training, RemoteTraining),
    (Monitor, RemoteMonitor),
    (Platform, Client),
]


def _public(cls: type) -> dict[str, Any]:
    return {
        name: value
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _shape(member: Any) -> list[tuple[str, str, str, str]] | str:
    """What a caller relies on: each parameter's name, kind, default and annotation (as
    written: ``from __future__ import annotations`` keeps them strings), and the return."""
    if isinstance(member, property):
        return "property"
    sig = inspect.signature(member)
    params = [
        (p.name, p.kind.name, repr(p.default), str(p.annotation)) for p in sig.parameters.values()
    ]
    return [*params, ("return", "", "", str(sig.return_annotation))]


@pytest.mark.parametrize(("local", "remote"), PAIRS, ids=lambda c: c.__name__)
def test_remote_methods_have_the_local_signatures(local: type, remote: type) -> None:
    local_api, remote_api = _public(local), _public(remote)
    extra = sorted(set(remote_api) - set(local_api))
    assert not extra, f"{remote.__name__} has public methods {local.__name__} lacks: {extra}"
    for name, member in remote_api.items():
        assert _shape(member) == _shape(local_api[name]), (
            f"{remote.__name__}.{name} must take exactly the arguments of {local.__name__}.{name}"
        )


@pytest.mark.parametrize(("local", "remote"), PAIRS, ids=lambda c: c.__name__)
def test_local_methods_exist_remotely_or_say_why_not(local: type, remote: type) -> None:
    missing = set(_public(local)) - set(_public(remote))
    assert missing == set(LOCAL_ONLY.get(local, {})), (
        f"{local.__name__} has public methods {remote.__name__} lacks: implement them "
        "remotely or list them in LOCAL_ONLY with the reason"
    )


def test_client_has_the_platform_parts() -> None:
    """The attributes a Platform user reaches through (``p.registry.register(...)``)."""
    parts = {
        "registry": RegistryClient,
        "features": RemoteFeatures,
        "training": RemoteTraining,
        "monitor": RemoteMonitor,
    }
    with Client("http://127.0.0.1:9") as client:
        for name, kind in parts.items():
            assert isinstance(getattr(client, name), kind), name
        assert client.actor == client.registry.actor  # actor=c.actor as on a Platform


def test_the_shape_sees_a_default_and_an_annotation() -> None:
    def a(x: int = 1) -> None: ...
    def b(x: int = 2) -> None: ...
    def c(x: str = 1) -> None: ...  # type: ignore[assignment]

    assert _shape(a) != _shape(b) and _shape(a) != _shape(c)
