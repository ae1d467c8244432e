"""``carrara up``: every Carrara service as a local child process, from one configuration.

Children (each with its own log file under ``{run_dir}/logs``):

- ``api`` — the control plane (registry, features, training and monitoring APIs on one port;
  ``carrara.services``), served by uvicorn;
- ``gateway`` — the serving gateway (gRPC + HTTP) over every model the registry deploys,
  following ``deployments`` events (a registry-driven ``carrara serve``);
- ``worker-N`` — ``carrara train worker`` (N = ``workers``);
- ``monitor`` — ``carrara monitor run`` (the monitoring consumer loop);
- ``materializer`` — ``carrara materialize --stream`` (``feature-updates`` -> online store);
- ``triggers`` — ``carrara train triggers`` when that command exists.

Every child gets the settings as ``CARRARA_*`` environment variables (so all of them see the
same stores). Ctrl-C or SIGTERM stops every child gracefully (SIGTERM, ``stop_timeout_s``,
then SIGKILL).

Supervision: once everything is up, a child that exits (a crash, a SIGKILL, the OOM killer)
is restarted on its own while the others keep running, with the same command line (so the
same ports: ports given as 0 are chosen once, before the first start). Restarts back off
exponentially per child: ``restart_backoff_s`` (0.5 s) doubling up to ``restart_backoff_max_s``
(30 s); a child that then runs ``restart_reset_s`` (60 s) is healthy again and its next crash
waits ``restart_backoff_s`` again. Each restart is logged, never silent: which child, its
exit code, the attempt, the delay and the end of its log, on ``up``'s standard error and in
``{run_dir}/logs/up.log`` (``Services.restarts`` counts them per child, ``Services.events``
lists them). ``max_restarts`` > 0 gives up on a child after that many restarts in a row
without a healthy run: ``up`` then stops everything and exits non-zero (0, the default:
never give up); ``restart = false`` restores the old policy (any exit stops everything).
A child that exits while ``up`` is still starting (before the API and the gateway answer) is
reported and everything stops: that is a configuration problem more often than a crash.

In Python (the end-to-end tests)::

    with Services(settings, UpConfig(api_port=0, gateway_http_port=0, gateway_grpc_port=0)) as svc:
        client = carrara.Client(svc.api_url, token, gateway=svc.gateway_url)

The configuration file is the settings TOML with an optional ``[up]`` table (``UpConfig``);
when it has one, the settings may sit under ``[carrara]`` or at the top level.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

import msgspec

from carrara.config import ENV_PREFIX, Settings, load_settings, read_config_file
from carrara.errors import ConfigError, FailedPreconditionError, UnavailableError
from carrara.ports import free_port

__all__ = [
    "ChildExitedError",
    "Restart",
    "Services",
    "UpConfig",
    "load_up_config",
    "main",
    "register",
]


class UpConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which processes ``carrara up`` starts and where they listen (port 0: pick a free one)."""

    host: str = "127.0.0.1"
    api_port: int = 8080
    gateway_http_port: int = 8000
    gateway_grpc_port: int = 8001
    workers: int = 1
    monitor: bool = True
    materializer: bool = True  # streaming materialization of the feature-updates topic
    triggers: bool = True  # started only when `carrara train triggers` exists
    run_dir: str = ""  # "" = {home}/run; logs go to {run_dir}/logs
    worker_poll_s: float = 0.5
    health_timeout_s: float = 90.0
    stop_timeout_s: float = 10.0
    restart: bool = True  # restart a child that exits once up is running (else: stop all)
    restart_backoff_s: float = 0.5  # the first delay; doubles per restart in a row
    restart_backoff_max_s: float = 30.0
    restart_reset_s: float = 60.0  # a child running this long is healthy: backoff resets
    max_restarts: int = 0  # restarts in a row before giving up on a child (0: never)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"[up] workers must be >= 0, got {self.workers}")
        if not 0 < self.restart_backoff_s <= self.restart_backoff_max_s:
            raise ConfigError(
                "[up] restart_backoff_s must be > 0 and <= restart_backoff_max_s, got "
                f"{self.restart_backoff_s} and {self.restart_backoff_max_s}"
            )
        if self.restart_reset_s < 0 or self.max_restarts < 0:
            raise ConfigError("[up] restart_reset_s and max_restarts must be >= 0")
        for name in ("api_port", "gateway_http_port", "gateway_grpc_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"[up] {name} must be a port number (0 = any), got {port}")


class ChildExitedError(FailedPreconditionError):
    """A child process of ``carrara up`` exited for good (while starting, with restarts off,
    or past ``max_restarts``); the message names it and shows its log."""

    child: str = ""


class Restart(msgspec.Struct, frozen=True, kw_only=True):
    """One restart of a child, as ``carrara up`` logged it."""

    child: str
    exit_code: int
    attempt: int  # restarts in a row (1 after a healthy run)
    delay_s: float
    uptime_s: float  # how long the exited process had run
    at: float  # time.time() when the exit was seen


def toml_value(value: Any) -> str:
    """``value`` as a TOML scalar (a settings file line's right-hand side)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return msgspec.json.encode(str(value)).decode()  # JSON string escapes are valid TOML


def load_up_config(path: str | Path | None, **overrides: Any) -> tuple[Settings, UpConfig]:
    """Settings and the ``[up]`` table from one TOML file (``$CARRARA_CONFIG`` when None);
    ``overrides`` replace ``[up]`` values (the command-line flags)."""
    file = path if path is not None else os.environ.get(f"{ENV_PREFIX}CONFIG")
    doc: dict[str, Any] = read_config_file(file) if file else {}
    up_values = dict(doc.get("up", {}))
    up_values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        up = msgspec.convert(up_values, UpConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid [up] configuration: {exc}") from exc
    if not file:
        return load_settings(None), up
    if "up" not in doc or "carrara" in doc:
        return load_settings(file), up
    # Settings at the top level beside [up]: hand load_settings the file without [up], so
    # the usual precedence (file < environment) holds.
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as out:
        for key, value in doc.items():
            if key != "up":
                out.write(f"{key} = {toml_value(value)}\n")
    try:
        return load_settings(out.name), up
    finally:
        os.unlink(out.name)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the ``CARRARA_*`` variables every child reads them from."""
    out = {}
    for field in msgspec.structs.fields(Settings):
        out[ENV_PREFIX + field.name.upper()] = str(getattr(settings, field.name))
    return out


def upgrade_schemas(url: str) -> None:
    """Apply every part's migrations once, before the children start: several processes
    opening a fresh database at the same moment would race to create the same tables."""
    import importlib

    from carrara.cli import SCHEMA_PARTS

    for _label, module_name in SCHEMA_PARTS:
        importlib.import_module(module_name).upgrade(url)


def _has_command(*words: str) -> bool:
    """Whether ``carrara WORDS...`` exists (e.g. ``train triggers``, added by another part)."""
    from carrara.cli import build_parser

    parser: Any = build_parser()
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            return False
        parser = actions[0].choices[word]
    return True


class _Child(msgspec.Struct):
    name: str
    argv: list[str]
    log_path: Path
    process: Any = None  # subprocess.Popen[bytes]
    log: Any = None  # the open log file
    started_at: float = 0.0  # time.monotonic() of the latest start
    restarts: int = 0  # in all
    streak: int = 0  # restarts in a row, without a healthy run between them
    restart_at: float | None = None  # when the scheduled restart is due (monotonic)


class Services:
    """Start every service as a child process; a context manager that stops them all.

    After ``start()`` a supervisor thread restarts children that exit (module docstring);
    ``restarts`` counts them per child, ``events`` lists them, and ``out`` (default: standard
    error) and ``{run_dir}/logs/up.log`` get a line for each.

    Attributes once started: ``api_url`` (``http://host:port``), ``gateway_url`` (the
    gateway's HTTP front), ``grpc_target`` (``host:port`` of its gRPC front), ``grpc_url``
    (``grpc://`` + that), ``run_dir``. With ``Settings.gateway_tls_cert`` the gateway speaks
    TLS: ``gateway_url`` is ``https://...`` and ``grpc_url`` ``grpcs://...``.
    """

    def __init__(
        self,
        settings: Settings,
        config: UpConfig | None = None,
        *,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        out: TextIO | None = None,
    ) -> None:
        config = config or UpConfig()
        if settings.online_store_url.startswith("memory:"):
            raise ConfigError(
                "carrara up runs several processes, and the memory:// online store lives in "
                "one: set online_store_url to redis://host:port/db"
            )
        if settings.resolved_event_log_url.rstrip("/") == "local:":
            raise ConfigError(
                "carrara up needs an event log shared by its processes: set event_log_url to "
                "local:///path/events.db or redis://host:port/db"
            )
        self.settings = settings
        self.config = config
        self._python = python
        self.run_dir = Path(config.run_dir or Path(settings.home) / "run")
        host = config.host
        self.api_port = config.api_port or free_port(host)
        self.http_port = config.gateway_http_port or free_port(host)
        self.grpc_port = config.gateway_grpc_port or free_port(host)
        self.api_url = f"http://{host}:{self.api_port}"
        tls = bool(settings.gateway_tls_cert)
        self.gateway_url = f"{'https' if tls else 'http'}://{host}:{self.http_port}"
        self.grpc_target = f"{host}:{self.grpc_port}"
        self.grpc_url = f"{'grpcs' if tls else 'grpc'}://{self.grpc_target}"
        # The settings travel as CARRARA_* variables; any other CARRARA_* of this process
        # (a config path, test variables) would be an unknown setting to the children.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self._env = {**inherited, **settings_env(settings), **(extra_env or {})}
        self._env["PYTHONUNBUFFERED"] = "1"
        # The console (in the API process) shows this gateway's live figures.
        if not settings.gateway_url:
            self._env[f"{ENV_PREFIX}GATEWAY_URL"] = self.gateway_url
        self.children: list[_Child] = []
        self.skipped: list[str] = []
        #: Set (e.g. by a signal handler) to stop waiting for health during ``start()``.
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._out = out
        #: Every restart so far, oldest first.
        self.events: list[Restart] = []
        self._failure: ChildExitedError | None = None  # a child given up on
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def _plan(self) -> list[tuple[str, list[str]]]:
        py, c, host = self._python, self.config, self.config.host
        plan = [
            (
                "api",
                [py, "-m", "carrara.up", "_api", "--host", host, "--port", str(self.api_port)],
            ),
            (
                "gateway",
                [
                    py,
                    "-m",
                    "carrara.up",
                    "_gateway",
                    "--host",
                    host,
                    "--http-port",
                    str(self.http_port),
                    "--grpc-port",
                    str(self.grpc_port),
                    "--state-dir",
                    str(self.run_dir / "gateway-state"),
                ],
            ),
        ]
        for i in range(1, c.workers + 1):
            plan.append(
                (
                    f"worker-{i}",
                    [py, "-m", "carrara", "train", "worker", "--poll", str(c.worker_poll_s)],
                )
            )
        if c.monitor:
            plan.append(
                (
                    "monitor",
                    [py, "-m", "carrara", "monitor", "run", "--group", "monitoring"],
                )
            )
        if c.materializer:
            plan.append(
                ("materializer", [py, "-m", "carrara", "materialize", "--stream", "--quiet"])
            )
        if c.triggers:
            if _has_command("train", "triggers"):
                plan.append(("triggers", [py, "-m", "carrara", "train", "triggers"]))
            else:
                self.skipped.append("triggers (no `carrara train triggers` command)")
        return plan

    def start(self) -> Services:
        """Start every child and wait until the API and the gateway answer /healthz."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        upgrade_schemas(self.settings.resolved_registry_url)
        self._stopping.clear()
        self._failure = None
        try:
            for name, argv in self._plan():
                child = _Child(name, argv, logs / f"{name}.log")
                child.log = open(child.log_path, "ab")  # noqa: SIM115 - closed in stop()
                self._spawn(child)
                self.children.append(child)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        if self.config.restart and not self.cancelled.is_set():
            self._supervisor = threading.Thread(
                target=self._supervise_loop, name="carrara-up-supervisor", daemon=True
            )
            self._supervisor.start()
        return self

    def _spawn(self, child: _Child) -> None:
        env = self._env
        if child.name == "gateway":
            # The gateway serves from deployment events and the artifact store: it gets no
            # registry database URL (credentials included).
            env = {k: v for k, v in env.items() if k != ENV_PREFIX + "REGISTRY_URL"}
        child.process = subprocess.Popen(
            child.argv,
            stdout=child.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches `up`, which stops children in order
        )
        child.started_at = time.monotonic()

    # -- supervision ----------------------------------------------------------------------

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far per child (every child listed, 0 when never restarted)."""
        return {c.name: c.restarts for c in self.children}

    def _say(self, message: str) -> None:
        """A line of ``up`` itself: to ``out`` (standard error) and ``logs/up.log``."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.run_dir / "logs" / "up.log", "a", encoding="utf-8") as fh:
                fh.write(f"{stamp} {message}\n")
        except OSError:
            pass  # the console line below still tells
        out = self._out if self._out is not None else sys.stderr
        print(f"carrara up: {message}", file=out, flush=True)

    def _supervise_loop(self) -> None:
        while not self._stopping.wait(0.1):
            try:
                self.supervise()
            except Exception as exc:  # keep supervising; say what went wrong
                self._say(f"supervisor error: {type(exc).__name__}: {exc}")

    def supervise(self) -> None:
        """One supervision pass (the supervisor thread runs it every 0.1 s): schedule the
        restart of each child that exited, start those whose delay has passed, reset the
        backoff of children that ran ``restart_reset_s``, give up past ``max_restarts``."""
        c = self.config
        with self._lock:
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.restart_at = None
                        note = f"--- carrara up: restart {child.restarts} of {child.name} ---\n"
                        child.log.write(note.encode())
                        child.log.flush()
                        self._spawn(child)
                    continue
                code = child.process.poll()
                uptime = now - child.started_at
                if code is None:
                    if child.streak and uptime >= c.restart_reset_s:
                        child.streak = 0  # healthy again
                    continue
                if self._failure is not None and self._failure.child == child.name:
                    continue
                if uptime >= c.restart_reset_s:
                    child.streak = 0
                tail = self.log_tail(child.name)
                if not c.restart or (c.max_restarts and child.streak >= c.max_restarts):
                    after = f" after {child.streak} restarts in a row" if c.restart else ""
                    failure = ChildExitedError(
                        f"{child.name} exited with code {code}{after}; last lines of "
                        f"{child.log_path}:\n{tail}"
                    )
                    failure.child = child.name
                    if self._failure is None:
                        self._failure = failure
                        self._say(f"giving up: {failure}")
                    continue
                child.streak += 1
                child.restarts += 1
                delay = min(c.restart_backoff_max_s, c.restart_backoff_s * 2 ** (child.streak - 1))
                child.restart_at = now + delay
                self.events.append(
                    Restart(
                        child=child.name,
                        exit_code=code,
                        attempt=child.streak,
                        delay_s=delay,
                        uptime_s=round(uptime, 3),
                        at=time.time(),
                    )
                )
                self._say(
                    f"{child.name} (pid {child.process.pid}) exited with code {code} after "
                    f"{uptime:.1f} s; restarting it in {delay:.1f} s (attempt {child.streak}, "
                    f"{child.restarts} in all); last lines of {child.log_path}:\n{tail}"
                )

    def wait_healthy(self) -> None:
        """Block until the API and the gateway answer (ChildExitedError if a child exits,
        UnavailableError past ``health_timeout_s``)."""
        import httpx

        deadline = time.monotonic() + self.config.health_timeout_s
        pending = {"api": f"{self.api_url}/healthz", "gateway": f"{self.gateway_url}/healthz"}
        # verify=False: with gateway TLS, this probes our own child's /healthz on the port we
        # gave it and sends nothing secret; its certificate may not name this host.
        with httpx.Client(timeout=2.0, verify=False) as http:
            while pending and not self.cancelled.is_set():
                self.check()
                for name, url in list(pending.items()):
                    try:
                        if http.get(url).status_code == 200:
                            del pending[name]
                    except httpx.HTTPError:
                        pass
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"{', '.join(pending)} did not answer /healthz within "
                        f"{self.config.health_timeout_s:.0f} s; see {self.run_dir / 'logs'}"
                    )
                time.sleep(0.2)

    def check(self) -> None:
        """ChildExitedError naming a child that exited for good, with its exit code and log:
        any exit while starting (or with ``restart`` off); once supervised, only a child
        given up on (``max_restarts``). A child waiting for its restart is no error."""
        if self._failure is not None:
            raise self._failure
        if self._supervisor is not None:
            return
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise ChildExitedError(
                    f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                    + self.log_tail(child.name)
                )

    def log_tail(self, name: str, lines: int = 20) -> str:
        for child in self.children:
            if child.name == name:
                try:
                    text = child.log_path.read_text(errors="replace")
                except FileNotFoundError:
                    return ""
                return "\n".join(text.splitlines()[-lines:])
        raise KeyError(name)

    def stop(self) -> dict[str, int]:
        """SIGTERM every child, wait ``stop_timeout_s``, SIGKILL the rest; returns exit codes."""
        self._stopping.set()  # no restart from here on
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()
        with self._lock:
            children, self.children = self.children, []
        for child in reversed(children):  # workers and monitor first, the API last
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        codes: dict[str, int] = {}
        for child in children:
            try:
                codes[child.name] = child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                codes[child.name] = child.process.wait()
            child.log.close()
        self.children = children  # keep them listed (log_tail) after the stop
        for child in children:
            child.process = _Exited(codes[child.name])
        return codes

    def urls(self) -> dict[str, str]:
        return {
            "api": self.api_url,
            "console": f"{self.api_url}/console",
            "gateway (HTTP)": self.gateway_url,
            "gateway (gRPC)": self.grpc_target,
        }

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Exited:
    """Stands in for a reaped process after ``stop()``."""

    def __init__(self, code: int) -> None:
        self.returncode = code

    def poll(self) -> int:
        return self.returncode


# -- the child processes ------------------------------------------------------------------


def _run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from carrara.services import ControlPlane

    plane = ControlPlane(load_settings(None))
    try:
        uvicorn.run(
            plane.app,
            host=args.host,
            port=args.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
    finally:
        plane.close()
    return 0


def _run_gateway(args: argparse.Namespace) -> int:
    """The gateway over every model the registry deploys (``carrara serve`` with a registry
    source that is not limited to named models). It reads deployments from the event log and
    artifacts from the artifact store; it never opens the registry database."""

    from carrara.core import FeatureCache
    from carrara.eventlog import open_event_log
    from carrara.feature_cache.online_store import open_online_store
    from carrara.gateway.auth import FrontAuth
    from carrara.gateway.embedded import serving_store
    from carrara.gateway.engine import ServingEngine
    from carrara.gateway.prediction_log import PredictionLogger
    from carrara.gateway.registry_source import DeploymentFollower
    from carrara.gateway.server import GatewayServer, serve_until_signalled
    from carrara.gateway.service import Gateway
    from carrara.registry.artifacts import ArtifactStore

    settings = load_settings(None)
    store = open_online_store(settings.online_store_url)
    predictions = open_event_log(settings.resolved_event_log_url)
    deployments = open_event_log(settings.resolved_event_log_url)
    logger = PredictionLogger(predictions)
    engine = ServingEngine(
        serving_store(store),
        cache=FeatureCache(
            capacity=settings.cache_capacity, ttl_seconds=settings.cache_ttl_seconds
        ),
        sink=logger,
    )
    follower = DeploymentFollower(
        engine,
        deployments,
        ArtifactStore(settings.resolved_artifact_path),
        state_dir=args.state_dir,
    )
    gateway = Gateway(engine, follower=follower)
    try:
        follower.restore()  # the last good state, before (and without) any event
        follower.start()
        auth = FrontAuth.build(
            tokens=[settings.gateway_token] if settings.gateway_token else [],
            tls_cert=settings.gateway_tls_cert,
            tls_key=settings.gateway_tls_key,
        )
        server = GatewayServer(
            gateway, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port, auth=auth
        )

        serve_until_signalled(server, engine.models)
    finally:
        follower.stop()
        gateway.close()
        logger.close()  # flushes the prediction log
        deployments.close()
        predictions.close()
        store.close()
    return 0


# -- the command line ---------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    settings, up = load_up_config(
        args.config,
        host=args.host,
        api_port=args.api_port,
        gateway_http_port=args.http_port,
        gateway_grpc_port=args.grpc_port,
        workers=args.workers,
        run_dir=args.run_dir,
    )
    services = Services(settings, up)
    stop = services.cancelled  # a signal during start-up stops waiting for health, too

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    out: IO[str] = sys.stdout
    try:
        services.start()
        for name, url in services.urls().items():
            print(f"{name:<16} {url}", file=out)
        for child in services.children:
            print(
                f"{child.name:<16} pid {child.process.pid}, log {child.log_path}",
                file=out,
            )
        for what in services.skipped:
            print(f"skipped          {what}", file=out)
        if not stop.is_set():
            supervised = "; a child that exits is restarted" if up.restart else ""
            print(
                f"carrara up: running{supervised}; Ctrl-C stops every service",
                file=out,
                flush=True,
            )
        while not stop.wait(0.5):
            services.check()
    except ChildExitedError as exc:
        print(f"carrara up: {exc}", file=sys.stderr)
        services.stop()
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    restarted = {n: r for n, r in services.restarts.items() if r}
    codes = services.stop()
    print(
        "carrara up: stopped " + ", ".join(f"{n} ({c})" for n, c in codes.items()),
        file=out,
    )
    if restarted:
        print(
            "carrara up: restarts " + ", ".join(f"{n} {r}" for n, r in restarted.items()),
            file=out,
        )
    return 0


def register(sub: Any) -> None:
    """Add ``carrara up`` to the top-level command line."""
    p = sub.add_parser("up", help="run every service (API, gateway, workers, monitor) locally")
    p.add_argument("--config", help="settings TOML with an optional [up] table")
    p.add_argument("--host", default=None)
    p.add_argument("--api-port", type=int, default=None)
    p.add_argument("--http-port", type=int, default=None, help="gateway HTTP port")
    p.add_argument("--grpc-port", type=int, default=None, help="gateway gRPC port")
    p.add_argument("--workers", type=int, default=None, help="training workers")
    p.add_argument("--run-dir", default=None, help="logs go to RUN_DIR/logs")
    p.set_defaults(func=_cmd_up)


def main(argv: Sequence[str] | None = None) -> int:
    """The child processes' entry points (``python -m carrara.up _api|_gateway``)."""
    parser = argparse.ArgumentParser(prog="python -m carrara.up")
    sub = parser.add_subparsers(dest="role", required=True)
    api = sub.add_parser("_api")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8080)
    api.set_defaults(func=_run_api)
    gw = sub.add_parser("_gateway")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--http-port", type=int, default=8000)
    gw.add_argument("--grpc-port", type=int, default=8001)
    gw.add_argument("--state-dir", default="gateway-state", help="the gateway's last good state")
    gw.set_defaults(func=_run_gateway)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
