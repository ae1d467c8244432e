"""What the generator talks to: Carrara Predict and KServe v2 over gRPC, HTTP, or a callable.

Every target is driven from one asyncio loop thread: ``send(token, entity_ids, done)`` starts a
request without waiting and ``done(token, completion_ns, code)`` is called on that loop once it
ends (``code`` is ``"OK"``, a gRPC status name, ``HTTP_<status>`` or a client-side failure such
as ``TIMEOUT``). The completion time is taken as early as the client can see it (gRPC: in the
channel's callback thread; HTTP: when the last body byte is parsed), not when the loop gets to
it.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import msgspec

from carrara.errors import CarraraError, InvalidArgumentError
from carrara.loadgen.distributions import EntitySpec

__all__ = [
    "CallableTarget",
    "DoneFn",
    "GrpcTarget",
    "HttpTarget",
    "NullTarget",
    "Target",
    "TargetSpec",
    "build_target",
    "parse_target",
]

#: (token, completion time in ``time.monotonic_ns``, status code)
DoneFn = Callable[[int, int, str], None]
TargetKind = Literal["grpc", "kserve", "http", "null"]


class TargetSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A network target, picklable so each worker process can build its own client."""

    kind: TargetKind
    address: str = ""  # host:port
    model: str = "default"
    http_path: str = "/predict/{model}"
    batch: int = 1
    entities: EntitySpec = msgspec.field(default_factory=EntitySpec)
    timeout_s: float = 5.0
    max_connections: int = 1024  # HTTP: keep-alive connections opened on demand up to this

    def describe(self) -> str:
        where = {
            "grpc": f"grpc://{self.address} Carrara Predict",
            "kserve": f"kserve://{self.address} KServe v2 ModelInfer",
            "http": f"http://{self.address}{self.http_path.format(model=self.model)}",
            "null": "null target (generator ceiling)",
        }[self.kind]
        return f"{where}, model {self.model!r}, batch {self.batch}, {self.entities.describe()}"


def parse_target(url: str) -> tuple[TargetKind, str]:
    """``grpc://h:p`` | ``kserve://h:p`` | ``http://h:p`` | ``null`` -> (kind, host:port)."""
    if url == "null":
        return "null", ""
    parts = urlsplit(url)
    if parts.scheme not in ("grpc", "kserve", "http") or not parts.hostname or not parts.port:
        raise InvalidArgumentError(
            f"target {url!r} is not grpc://HOST:PORT, kserve://HOST:PORT, http://HOST:PORT or null"
        )
    kind: TargetKind = parts.scheme  # type: ignore[assignment]
    return kind, f"{parts.hostname}:{parts.port}"


class Target(ABC):
    """One client connection set, used from one event loop."""

    async def open(self) -> None:  # noqa: B027 - optional hook; most targets connect here
        """Connect (before the clock starts, so connection setup is not measured)."""

    @abstractmethod
    def send(self, token: int, entity_ids: list[str], done: DoneFn) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class NullTarget(Target):
    """Completes every request on the next loop turn: measures the generator on its own."""

    def send(self, token: int, entity_ids: list[str], done: DoneFn) -> None:
        asyncio.get_running_loop().call_soon(done, token, time.monotonic_ns(), "OK")


class CallableTarget(Target):
    """An in-process call (the embedded gateway): runs ``fn(entity_ids)`` synchronously on the
    loop thread, so a slow call delays later sends and that delay shows up in their latency."""

    def __init__(self, fn: Callable[[list[str]], object]) -> None:
        self.fn = fn

    def send(self, token: int, entity_ids: list[str], done: DoneFn) -> None:
        try:
            self.fn(entity_ids)
            code = "OK"
        except CarraraError as exc:
            code = exc.grpc_code
        except Exception as exc:
            code = f"EXCEPTION_{type(exc).__name__}"
        t = time.monotonic_ns()
        asyncio.get_running_loop().call_soon(done, token, t, code)


def carrara_request(model: str) -> Callable[[list[str]], bytes]:
    from carrara.v1 import predict_pb2

    def build(ids: list[str]) -> bytes:
        return bytes(predict_pb2.PredictRequest(model=model, entity_ids=ids).SerializeToString())

    return build


def kserve_request(model: str) -> Callable[[list[str]], bytes]:
    from tritonclient.grpc import service_pb2 as kserve

    pack = struct.Struct("<I").pack

    def build(ids: list[str]) -> bytes:
        raw = b"".join(pack(len(b)) + b for b in (e.encode() for e in ids))
        request = kserve.ModelInferRequest(
            model_name=model,
            inputs=[
                kserve.ModelInferRequest.InferInputTensor(
                    name="entity_ids", datatype="BYTES", shape=[len(ids)]
                )
            ],
            raw_input_contents=[raw],
        )
        return bytes(request.SerializeToString())

    return build


class GrpcTarget(Target):
    """Unary gRPC calls through the synchronous channel's ``future()``: the C core does the
    I/O off the GIL and a done-callback timestamps the completion; no asyncio stub in between.
    Requests and responses travel as bytes (responses are not parsed; the status is enough)."""

    def __init__(
        self,
        address: str,
        method: str,
        build: Callable[[list[str]], bytes],
        timeout_s: float,
    ) -> None:
        self.address = address
        self.method = method
        self.build = build
        self.timeout_s = timeout_s
        self._channel: Any = None
        self._call: Any = None

    async def open(self) -> None:
        import grpc

        self._channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        ready = grpc.channel_ready_future(self._channel)
        await asyncio.get_running_loop().run_in_executor(None, ready.result, 10.0)
        self._call = self._channel.unary_unary(self.method)

    def send(self, token: int, entity_ids: list[str], done: DoneFn) -> None:
        loop = asyncio.get_running_loop()
        future = self._call.future(self.build(entity_ids), timeout=self.timeout_s)

        def finished(f: Any) -> None:
            t = time.monotonic_ns()
            code = f.code()
            name = "OK" if code is None else code.name
            loop.call_soon_threadsafe(done, token, t, name)

        future.add_done_callback(finished)

    async def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, owner: HttpTarget) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.token: int | None = None
        self.started_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self, token: int, request: bytes) -> None:
        assert self.transport is not None
        self.token = token
        self.started_ns = time.monotonic_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.token is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            body_start = end + 4
            pos = head.find(b"\r\ncontent-length:")
            if pos >= 0:
                stop = head.find(b"\r\n", pos + 2)
                length = int(head[pos + 17 : stop if stop >= 0 else len(head)])
                total = body_start + length
                if len(self.buf) < total:
                    return
            elif b"transfer-encoding: chunked" in head:
                last = self.buf.find(b"0\r\n\r\n", body_start)
                if last < 0:
                    return
                total = last + 5
            else:
                total = body_start
            t = time.monotonic_ns()
            status = int(head[9:12])
            keep = b"\r\nconnection: close" not in head
            del self.buf[:total]
            token, self.token = self.token, None
            self.owner._finished(self, token, t, "OK" if 200 <= status < 300 else f"HTTP_{status}")
            if not keep:
                self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class HttpTarget(Target):
    """``POST {path}`` with ``{"entity_ids": [...]}`` JSON bodies on a pool of keep-alive
    connections, opened on demand (one request in flight per connection, as HTTP/1.1 clients
    do). A hand-written protocol rather than httpx: the client must cost a few microseconds a
    request, not the hundred an HTTP library does, or it would be the bottleneck."""

    def __init__(
        self, address: str, path: str, timeout_s: float, max_connections: int = 1024
    ) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.path = path
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._head = (
            f"POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n"
            "content-length: "
        ).encode()
        self._encoder = msgspec.json.Encoder()
        self._idle: list[_HttpConnection] = []
        self._all: set[_HttpConnection] = set()
        self._connecting = 0
        self._waiting: collections.deque[tuple[int, bytes]] = collections.deque()
        self._dones: dict[int, DoneFn] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        conn = await self._connect()
        self._idle.append(conn)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _connect(self) -> _HttpConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _HttpConnection(self), self.host, self.port)
        self._all.add(conn)
        return conn

    def send(self, token: int, entity_ids: list[str], done: DoneFn) -> None:
        body = self._encoder.encode({"entity_ids": entity_ids})
        request = b"%s%d\r\n\r\n%s" % (self._head, len(body), body)
        self._dones[token] = done
        if self._idle:
            self._idle.pop().start(token, request)
        elif len(self._all) + self._connecting < self.max_connections:
            self._connecting += 1
            asyncio.get_running_loop().create_task(self._connect_and_start(token, request))
        else:
            self._waiting.append((token, request))

    async def _connect_and_start(self, token: int, request: bytes) -> None:
        try:
            conn = await self._connect()
        except OSError:
            self._connecting -= 1
            self._fail(token, "CONNECT_ERROR")
            return
        self._connecting -= 1
        conn.start(token, request)

    def _fail(self, token: int, code: str) -> None:
        done = self._dones.pop(token, None)
        if done is not None:
            done(token, time.monotonic_ns(), code)

    def _finished(self, conn: _HttpConnection, token: int, t: int, code: str) -> None:
        done = self._dones.pop(token, None)
        if done is not None:
            done(token, t, code)
        if self._waiting:
            conn.start(*self._waiting.popleft())
        else:
            self._idle.append(conn)

    def _lost(self, conn: _HttpConnection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.token is not None:
            token, conn.token = conn.token, None
            self._fail(token, "CONNECTION_CLOSED")

    async def _sweep(self) -> None:
        """Fail requests older than the timeout (closing their connection), every 50 ms."""
        timeout_ns = int(self.timeout_s * 1e9)
        while True:
            await asyncio.sleep(0.05)
            cut = time.monotonic_ns() - timeout_ns
            for conn in list(self._all):
                if conn.token is not None and conn.started_ns < cut:
                    token, conn.token = conn.token, None
                    self._fail(token, "TIMEOUT")
                    conn.abort()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._all):
            conn.abort()
        for token, _ in list(self._waiting):
            self._fail(token, "TIMEOUT")
        self._waiting.clear()
        await asyncio.sleep(0)


def build_target(spec: TargetSpec) -> Target:
    if spec.kind == "grpc":
        return GrpcTarget(
            spec.address, "/carrara.v1.Predict/Predict", carrara_request(spec.model), spec.timeout_s
        )
    if spec.kind == "kserve":
        return GrpcTarget(
            spec.address,
            "/inference.GRPCInferenceService/ModelInfer",
            kserve_request(spec.model),
            spec.timeout_s,
        )
    if spec.kind == "http":
        return HttpTarget(
            spec.address,
            spec.http_path.format(model=spec.model),
            spec.timeout_s,
            spec.max_connections,
        )
    if spec.kind == "null":
        return NullTarget()
    raise InvalidArgumentError(f"unknown target kind {spec.kind!r}")
