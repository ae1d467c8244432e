"""Run the gateway's fronts (``carrara serve``): the native gRPC front (C++, no Python per
request) and the HTTP front (Starlette on uvicorn), over one native engine."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future

import uvicorn

from carrara import __version__, _native
from carrara.gateway.auth import FrontAuth
from carrara.gateway.http_front import create_app
from carrara.gateway.service import Gateway

__all__ = ["GatewayServer", "ServerThread", "serve_until_signalled"]


class GatewayServer:
    """Both fronts on ``host`` (loopback by default); port 0 picks a free port.

    ``auth`` (off by default) puts bearer tokens and/or TLS on both fronts
    (``carrara.gateway.auth``)."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        grace_s: float = 5.0,
        max_message_bytes: int = 16 << 20,
        auth: FrontAuth | None = None,
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.grace_s = grace_s
        self.max_message_bytes = max_message_bytes
        self.auth = auth or FrontAuth()
        self._grpc: _native.GrpcServer | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._grpc = _native.GrpcServer(
            self.gateway.engine.native,
            host=self.host,
            port=self.grpc_port,
            max_message_bytes=self.max_message_bytes,
            version=__version__,
            **self.auth.grpc_options(),
        )
        self.grpc_port = self._grpc.port
        self._grpc.set_serving(True)
        config = uvicorn.Config(
            create_app(self.gateway, auth_tokens=self.auth.tokens),
            host=self.host,
            port=self.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            **self.auth.uvicorn_options(),
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._grpc.shutdown(0.0)
                self._http_task.result()  # raises the startup error
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Graceful: report NOT_SERVING, refuse new requests, let in-flight ones finish
        (up to ``grace_s``), then close both fronts."""
        if self._grpc is not None:
            self._grpc.set_serving(False)
        await self.gateway.drain(self.grace_s)
        if self._grpc is not None:
            await asyncio.to_thread(self._grpc.shutdown, self.grace_s)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task


class ServerThread:
    """A ``GatewayServer`` on its own event loop in a background thread (tests, the demo)."""

    def __init__(self, make_server: Callable[[], GatewayServer]) -> None:
        self._make = make_server
        self._loop = asyncio.new_event_loop()
        self._started: Future[GatewayServer] = Future()
        self._thread = threading.Thread(target=self._run, name="carrara-gateway", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._make()
            self._loop.run_until_complete(server.start())
        except BaseException as exc:
            self._loop.close()  # nothing runs on it: stop() is never called after this
            self._started.set_exception(exc)
            return
        self._started.set_result(server)
        self._loop.run_forever()

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self._thread.start()
        return self._started.result(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        server = self._started.result()
        asyncio.run_coroutine_threadsafe(server.stop(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._loop.close()


def serve_until_signalled(server: GatewayServer, models: Callable[[], list[str]]) -> None:
    """Run ``server`` (uvloop) until SIGINT or SIGTERM, then drain and stop it: what
    ``carrara serve`` and ``carrara up``'s gateway process do. Prints one line once serving
    (ports, the models ``models()`` names, auth)."""
    import uvloop

    async def main() -> None:
        await server.start()
        print(
            f"carrara gateway: gRPC {server.host}:{server.grpc_port}, "
            f"HTTP {server.host}:{server.http_port}, models: {', '.join(models()) or 'none'}, "
            f"auth: {server.auth.describe()}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    uvloop.run(main())
