"""
Carrara's native serving core (private: import carrara.core instead).
"""

from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing

__all__: list[str] = [
    "Assembler",
    "ERROR_CODES",
    "Engine",
    "Executor",
    "FeatureCache",
    "FeatureStore",
    "FeatureVector",
    "GrpcServer",
    "ManualClock",
    "Plan",
    "PythonExecutor",
    "PythonStore",
    "RedisStore",
    "Router",
    "TritonExecutor",
    "stable_hash",
]

class ManualClock:
    """
    A clock that moves only when told to (for TTL tests).
    """
    def __init__(
        self, start_seconds: typing.SupportsFloat | typing.SupportsIndex = 0.0
    ) -> None: ...
    def advance(self, seconds: typing.SupportsFloat | typing.SupportsIndex) -> None: ...
    def now(self) -> float: ...
    def set(self, seconds: typing.SupportsFloat | typing.SupportsIndex) -> None: ...

class FeatureVector:
    """
    One entity's values in one feature-group version (read-only).
    """

    __hash__: typing.ClassVar[None] = None
    @staticmethod
    def decode(data: typing.Any) -> FeatureVector: ...
    def __eq__(self, arg0: typing.Any) -> bool: ...
    def __init__(
        self,
        entity_id: str,
        group: str,
        group_version: typing.SupportsInt | typing.SupportsIndex,
        values: typing.Annotated[numpy.typing.ArrayLike, numpy.float32],
        missing: typing.Annotated[numpy.typing.ArrayLike, numpy.bool] | None = None,
        event_timestamp_us: typing.SupportsInt | typing.SupportsIndex = 0,
        created_timestamp_us: typing.SupportsInt | typing.SupportsIndex = 0,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __repr__(self) -> str: ...
    def encode(self) -> bytes: ...
    @property
    def created_timestamp_us(self) -> int: ...
    @property
    def entity_id(self) -> str: ...
    @property
    def event_timestamp_us(self) -> int: ...
    @property
    def group(self) -> str: ...
    @property
    def group_version(self) -> int: ...
    @property
    def missing(self) -> numpy.typing.NDArray[numpy.bool]:
        """
        bool mask, True = missing (a copy)
        """
    @property
    def values(self) -> numpy.typing.NDArray[numpy.float32]:
        """
        float32 values (a copy)
        """

class FeatureCache:
    """
    Sharded LRU cache of decoded feature vectors with per-entry TTL.
    """
    def __contains__(self, key: typing.Any) -> bool: ...
    def __init__(
        self,
        capacity: typing.SupportsInt | typing.SupportsIndex = 10000,
        ttl_seconds: typing.SupportsFloat | typing.SupportsIndex = 30.0,
        shards: typing.SupportsInt | typing.SupportsIndex = 16,
        clock: ManualClock | None = None,
    ) -> None: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...
    def erase(self, key: typing.Any) -> bool: ...
    def get(self, key: typing.Any) -> typing.Any: ...
    def get_many(self, keys: collections.abc.Sequence) -> list: ...
    def keys_by_recency(
        self, shard: typing.SupportsInt | typing.SupportsIndex = 0
    ) -> list[str]: ...
    def purge_expired(self) -> int: ...
    def put(
        self,
        key: typing.Any,
        value: typing.Any,
        ttl_seconds: typing.SupportsFloat | typing.SupportsIndex | None = None,
    ) -> None: ...
    def put_many(
        self,
        keys: collections.abc.Sequence,
        values: collections.abc.Sequence,
        ttl_seconds: typing.SupportsFloat | typing.SupportsIndex | None = None,
    ) -> None: ...
    def stats(self) -> dict: ...
    @property
    def capacity(self) -> int: ...
    @property
    def shards(self) -> int: ...
    @property
    def ttl_seconds(self) -> float: ...

class Plan:
    """
    Cache lookups for one batch: hits kept, misses to fetch.
    """
    @property
    def missing_keys(self) -> list[str]: ...
    @property
    def size(self) -> int: ...

class Assembler:
    """
    Feature vectors of several groups -> one float32 [n, d] tensor.
    """
    def __init__(self, spec: typing.Any) -> None: ...
    def assemble(self, vectors: collections.abc.Sequence, overrides: typing.Any = None) -> tuple:
        """
        vectors: one list per group of bytes | FeatureVector | None per entity.
        """
    def assemble_plan(self, plan: Plan, overrides: typing.Any = None) -> tuple: ...
    def column_index(self, name: str) -> int | None: ...
    def fill(
        self, plan: Plan, values: collections.abc.Sequence, cache: FeatureCache | None = None
    ) -> None: ...
    def key(
        self, group: typing.SupportsInt | typing.SupportsIndex, entity_id: typing.Any
    ) -> str: ...
    def plan(self, cache: FeatureCache, entity_ids: collections.abc.Sequence) -> Plan: ...
    @property
    def column_names(self) -> list[str]: ...
    @property
    def dim(self) -> int: ...
    @property
    def group_count(self) -> int: ...

class Router:
    """
    Deterministic, sticky split of entities over variants.
    """
    def __init__(self, policy: typing.Any) -> None: ...
    def bucket(self, entity_id: typing.Any) -> int: ...
    def route(self, entity_id: typing.Any) -> int: ...
    def route_many(
        self, entity_ids: collections.abc.Sequence
    ) -> numpy.typing.NDArray[numpy.uint32]: ...
    def route_name(self, entity_id: typing.Any) -> str: ...
    @property
    def fallback_index(self) -> int | None: ...
    @property
    def shadows(self) -> list[str]: ...
    @property
    def variant_names(self) -> list[str]: ...

class FeatureStore:
    """
    An online store the native engine reads from.
    """

class PythonStore(FeatureStore):
    """
    A Python online store (an object with mget(keys) -> list[bytes | None]).
    """
    def __init__(self, reader: typing.Any) -> None: ...

class RedisStore(FeatureStore):
    """
    Redis read natively (hiredis): pooled, pipelined MGET with a deadline.
    """
    def __init__(
        self,
        url: str,
        key_prefix: str = "",
        connect_timeout_s: typing.SupportsFloat | typing.SupportsIndex = 0.2,
        down_backoff_s: typing.SupportsFloat | typing.SupportsIndex = 0.25,
    ) -> None: ...
    def mget(
        self,
        keys: collections.abc.Sequence[str],
        timeout_s: typing.SupportsFloat | typing.SupportsIndex = 0.05,
    ) -> list: ...
    def ping(self, timeout_s: typing.SupportsFloat | typing.SupportsIndex = 1.0) -> None:
        """
        One PING round trip (opens a pooled connection); raises when Redis does not answer.
        """
    def stats(self) -> dict: ...

class Executor:
    """
    Where a variant's assembled features become predictions.
    """
    def close(self) -> None: ...
    @property
    def in_process(self) -> bool: ...
    @property
    def input_dim(self) -> int: ...
    @property
    def output_dim(self) -> int: ...

class PythonExecutor(Executor):
    """
    Dynamic batcher over a Python model: backend.infer(x) once per batch (one GIL take).
    """
    def __init__(
        self,
        backend: typing.Any,
        input_dim: typing.SupportsInt | typing.SupportsIndex,
        output_dim: typing.SupportsInt | typing.SupportsIndex,
        max_batch_size: typing.SupportsInt | typing.SupportsIndex = 64,
        max_queue_delay_us: typing.SupportsFloat | typing.SupportsIndex = 0.0,
        workers: typing.SupportsInt | typing.SupportsIndex = 1,
        in_process: bool = True,
        max_queued_rows: typing.SupportsInt | typing.SupportsIndex = 65536,
        label: str = "model",
    ) -> None: ...
    def stats(self) -> dict: ...

class Engine:
    """
    The native serving path: admission, routing, cache, store, batching.
    """
    def __init__(
        self,
        cache: FeatureCache,
        store: FeatureStore | None = None,
        max_in_flight: typing.SupportsInt | typing.SupportsIndex = 256,
        max_batch: typing.SupportsInt | typing.SupportsIndex = 1000,
        store_deadline_s: typing.SupportsFloat | typing.SupportsIndex = 0.05,
        negative_ttl_s: typing.SupportsFloat | typing.SupportsIndex = 5.0,
        log_max_bytes: typing.SupportsInt | typing.SupportsIndex = 67108864,
        log_predictions: bool = False,
    ) -> None: ...
    def close(self) -> None: ...
    def close_log(self) -> None: ...
    def deploy(
        self,
        model: str,
        policy: typing.Any,
        variants: collections.abc.Sequence,
        max_in_flight: typing.SupportsInt | typing.SupportsIndex = 0,
    ) -> None: ...
    def drain_log(
        self,
        max_records: typing.SupportsInt | typing.SupportsIndex = 500,
        wait_s: typing.SupportsFloat | typing.SupportsIndex = 0.05,
    ) -> typing.Any: ...
    def metrics(self) -> dict: ...
    def model_info(self, name: str) -> typing.Any: ...
    def models(self) -> list[str]: ...
    def predict(
        self,
        model: typing.Any,
        entity_ids: collections.abc.Sequence,
        overrides: typing.Any = None,
        request_id: typing.Any = None,
        version: str = "",
    ) -> tuple: ...
    def predict_async(
        self,
        model: typing.Any,
        entity_ids: collections.abc.Sequence,
        overrides: typing.Any,
        request_id: typing.Any,
        version: str,
        callback: typing.Any,
    ) -> None: ...
    def set_draining(self, draining: bool) -> None: ...
    def statistics(self, name: str = "") -> list: ...
    def undeploy(self, model: str) -> None: ...
    def wait_idle(self, timeout_s: typing.SupportsFloat | typing.SupportsIndex) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def ready(self) -> bool: ...

class TritonExecutor(Executor):
    """
    A model on a Triton server, called over native gRPC (KServe v2).
    """
    def __init__(
        self,
        url: str,
        model: str,
        model_version: str = "",
        output: str = "",
        timeout_s: typing.SupportsFloat | typing.SupportsIndex = 1.0,
        connect_timeout_s: typing.SupportsFloat | typing.SupportsIndex = 5.0,
    ) -> None: ...
    def infer(
        self, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]
    ) -> numpy.typing.NDArray[numpy.float32]:
        """
        One synchronous call (tests and checks; the engine calls it natively).
        """
    @property
    def input_name(self) -> str: ...
    @property
    def output_name(self) -> str: ...
    @property
    def platform(self) -> str: ...

class GrpcServer:
    """
    The native gRPC front: carrara.v1.Predict, KServe v2, health.
    """
    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: typing.SupportsInt | typing.SupportsIndex = 0,
        max_message_bytes: typing.SupportsInt | typing.SupportsIndex = 16777216,
        version: str = "0.1.0",
        auth_tokens: collections.abc.Sequence[str] = [],
        tls_cert_chain: str = "",
        tls_private_key: str = "",
        tls_client_ca: str = "",
    ) -> None:
        """
        Serves until shutdown(). Off by default: with auth_tokens, every call but grpc.health.v1 needs metadata 'authorization: Bearer <token>' (else UNAUTHENTICATED); tls_cert_chain/tls_private_key (PEM contents, not paths) make the port TLS-only; tls_client_ca (PEM) also requires client certificates it signed.
        """
    def set_serving(self, serving: bool) -> None: ...
    def shutdown(self, grace_s: typing.SupportsFloat | typing.SupportsIndex = 5.0) -> None: ...
    @property
    def port(self) -> int: ...

def _raise_error(code: typing.SupportsInt | typing.SupportsIndex, message: str) -> None:
    """
    Raise a core error with this code (for tests).
    """

def stable_hash(salt: typing.Any, entity_id: typing.Any) -> int:
    """
    The router's stable 64-bit hash of salt + id.
    """

ERROR_CODES: dict = {
    "OK": 0,
    "INVALID_ARGUMENT": 1,
    "NOT_FOUND": 2,
    "DECODE": 3,
    "RESOURCE_EXHAUSTED": 4,
    "FAILED_PRECONDITION": 5,
    "INTERNAL": 6,
    "CANCELLED": 7,
    "DEADLINE_EXCEEDED": 8,
    "UNAVAILABLE": 9,
}
__version__: str = "0.1.0"
