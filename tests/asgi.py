"""Calling an ASGI app in-process (no socket) from synchronous tests."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


def call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request to ``app`` through httpx's ASGI transport (base URL ``http://api``);
    ``kw`` as for :meth:`httpx.AsyncClient.request` (headers, json, content, ...)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())
