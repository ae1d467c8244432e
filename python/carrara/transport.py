"""The one HTTP client transport of the SDK: base URL, bearer token, timeouts, msgspec decoding
and the one reverse error map (``carrara.errors.error_for_response``).

``carrara.Client`` and ``carrara.registry.client.RegistryClient`` call every part of the
control plane (and the gateway's HTTP front) through it, so a failed answer becomes the same
``CarraraError`` class the service raised, whichever part answered::

    with Transport("http://127.0.0.1:8080", token) as t:
        models = t.call("GET", "/models", list[Model])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, overload

import httpx
import msgspec

from carrara import errors

__all__ = ["Transport", "raise_for_error"]

T = TypeVar("T")


def raise_for_error(response: httpx.Response, service: str) -> None:
    """Raise the ``CarraraError`` a failed answer stands for: the class of its
    ``{"error": <gRPC code>, "message": ...}`` body, else of its HTTP status."""
    if response.status_code < 400:
        return
    code: str | None = None
    message = response.text
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        if "message" in body:
            code, message = body["error"], str(body["message"])
        else:  # KServe's ``{"error": "message"}``: the status says which error
            message = body["error"]
    cls = errors.error_for_response(code, response.status_code)
    raise cls(f"{service}: {message}")


class Transport:
    """An ``httpx.Client`` with the bearer token, whose :meth:`call` raises ``CarraraError``
    for failed answers and decodes good ones into msgspec types. Pass ``http`` to share or
    inject a client (it is then not closed here); ``service`` names the API in errors."""

    def __init__(
        self,
        url: str = "",
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        http: httpx.Client | None = None,
        service: str = "control-plane API",
    ) -> None:
        self._owns = http is None
        self.http = http if http is not None else httpx.Client(base_url=url, timeout=timeout_s)
        self.token = token or None
        self.service = service
        self._auth = {"authorization": f"Bearer {token}"} if token else {}

    @property
    def base_url(self) -> str:
        return str(self.http.base_url)

    @overload
    def call(
        self,
        method: str,
        path: str,
        kind: type[T],
        *,
        json: Any = ...,
        params: Mapping[str, Any] | None = ...,
        content: bytes | None = ...,
        headers: Mapping[str, str] | None = ...,
        service: str | None = ...,
    ) -> T: ...

    @overload
    def call(
        self,
        method: str,
        path: str,
        kind: None,
        *,
        json: Any = ...,
        params: Mapping[str, Any] | None = ...,
        content: bytes | None = ...,
        headers: Mapping[str, str] | None = ...,
        service: str | None = ...,
    ) -> None: ...

    def call(
        self,
        method: str,
        path: str,
        kind: Any,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        service: str | None = None,
    ) -> Any:
        """``method path`` with ``json`` (any msgspec-encodable value but None) or raw
        ``content`` as the body; ``params`` whose value is None are left out. The answer decoded as
        ``kind`` (``bytes`` and ``str`` as they are; None or a 204: nothing)."""
        service = service or self.service
        sent = {"content-type": "application/json", **self._auth, **(headers or {})}
        if json is not None:
            content = msgspec.json.encode(json)
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            response = self.http.request(
                method, path, content=content, params=query or None, headers=sent
            )
        except httpx.HTTPError as exc:
            raise errors.UnavailableError(
                f"{service} at {self.http.base_url} unreachable: {exc}"
            ) from exc
        raise_for_error(response, service)
        if kind is None or response.status_code == 204:
            return None
        if kind is bytes:
            return response.content
        if kind is str:
            return response.text
        return msgspec.json.decode(response.content, type=kind)

    def close(self) -> None:
        if self._owns:
            self.http.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
