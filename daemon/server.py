"""The gRPC server and the daemon's life: lock, load, bind, serve, drain, exit.

`create_server(config, worker)` builds and binds a server without starting anything else, so
tests run a real one in-process on a temporary socket. `serve(config)` is `speclora serve`:
single-instance lock, models, worker, server, then SIGTERM/SIGINT -> drain -> exit 0.

Beside gRPC, the HTTP API (daemon/http, the OpenAI-compatible routes and /metrics) runs in the
same process: uvicorn in a thread of its own, started before the models load so that it can
answer 503 meanwhile, stopped after the worker has drained.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import ipaddress
import os
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from speclora.daemon.errors import SpecLoRAError
from speclora.daemon.servicer import LearningLoop, SpecLoRAServicer, add_to_server
from speclora.daemon.stats import StatsSnapshot, daemon_snapshot
from speclora.daemon.worker import Worker
from speclora.shared.config import Config
from speclora.shared.paths import (
    MAX_SOCKET_PATH_BYTES,
    Paths,
    daemon_socket_path,
    ensure_private_dir,
    resolve_paths,
)
from speclora.shared.pb import speclora_pb2 as pb

import speclora

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecLoRA"].full_name
TOKEN_METADATA_KEY = "authorization"
API_KEY_ENV = "SPECLORA_API_KEY"  # the HTTP API key itself (like OPENAI_API_KEY for clients)
# RPCs beyond the engine's capacity (streams, watchers, health) that may be in flight at once.
_EXTRA_RPCS = 32
# Room after the drain deadline for handlers to send their final status before grpc cancels.
_STOP_MARGIN_S = 2.0


class ServerSetupError(SpecLoRAError):
    """The daemon cannot listen as configured; the message says what to change."""


class AlreadyRunningError(SpecLoRAError):
    def __init__(self, pid: int | None, lock_file: Path) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"speclora is already running ({who}); lock held on {lock_file}")
        self.pid = pid


# ---------------------------------------------------------------------- single instance


class InstanceLock:
    """An exclusive flock on the lock file, holding the daemon's pid while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, retry_s: float = 0.5) -> InstanceLock:
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                # `speclora daemon status` probes the lock for an instant; retry briefly.
                if time.monotonic() >= deadline:
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise AlreadyRunningError(pid, self.path) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Empty the pid first: a stale pid must never point `daemon stop` at another process.
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------- addresses and tokens


def socket_path_for(config: Config, paths: Paths) -> Path:
    path = daemon_socket_path(config.server.socket_path, paths)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ServerSetupError(
            f"socket path {path} is {size} bytes; Unix sockets allow {MAX_SOCKET_PATH_BYTES}. "
            "Set server.socket_path (or SPECLORA_SERVER_SOCKET_PATH) to a shorter path"
        )
    return path


def is_loopback(host: str) -> bool:
    bare = host.strip("[]")
    try:
        return bare == "localhost" or ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def check_tcp_address(address: str, allow_non_loopback: bool, key: str = "tcp_address") -> str:
    host, _, port = address.rpartition(":")
    if not is_loopback(host) and not allow_non_loopback:
        raise ServerSetupError(
            f"server.{key} {address!r} is not a loopback address; anyone who can reach it "
            "could use the daemon. Use 127.0.0.1, or set server.allow_non_loopback: true"
        )
    return f"{host}:{port}"


def ensure_token(path: Path) -> str:
    """The TCP token: created once (0600) in the data dir; clients read the same file."""
    ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
            log.warning("token_file_permissions_fixed", path=str(path))
        token = path.read_text().strip()
        if token:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Calls over TCP must carry `authorization: Bearer <token>`; the Unix socket's 0600 mode
    is its own access control. Health checks stay open so supervisors can probe."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        return _guarded(handler, self._check)

    def _check(self, context: grpc.ServicerContext) -> None:
        if not context.peer().startswith(("ipv4:", "ipv6:")):
            return
        for key, value in context.invocation_metadata():
            if key == TOKEN_METADATA_KEY:
                given = value.removeprefix("Bearer ").strip().encode()
                if hmac.compare_digest(given, self._token):
                    return
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong token")
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"TCP calls need '{TOKEN_METADATA_KEY}: Bearer <token>' from the daemon's token file",
        )


def _guarded(handler: Any, check: Callable[[grpc.ServicerContext], None]) -> Any:
    def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return behavior(request, context)

        return guarded

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attr, make in kinds.items():
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


# ---------------------------------------------------------------------- HTTP


def http_api_key(config: Config, paths: Paths, loopback: bool) -> str | None:
    """The key HTTP clients must send: $SPECLORA_API_KEY, else server.http_api_key_file's
    content, else (off loopback only, where a key is required) the daemon's token file."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return key
    file = config.server.http_api_key_file
    if file:
        path = Path(file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ServerSetupError(
                f"server.http_api_key_file: cannot read {path}: {exc.strerror}"
            ) from None
        if not key:
            raise ServerSetupError(f"server.http_api_key_file: {path} is empty")
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("api_key_file_readable_by_others", path=str(path), hint="chmod 600")
        return key
    return None if loopback else ensure_token(paths.token_file)


class HttpServer:
    """The HTTP API: uvicorn serving an HttpApi on a socket bound here, in a thread."""

    def __init__(self, api: Any, sock: socket.socket, stop_margin_s: float = _STOP_MARGIN_S):
        import uvicorn

        self.api = api
        self.socket = sock
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = uvicorn.Config(
            api.app,
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="off",
            log_config=None,  # the daemon's logging stays as configured
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(stop_margin_s) or 1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        except BaseException:  # SystemExit from uvicorn's startup included
            log.exception("http_server_failed")

    def start(self, timeout_s: float = 10.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.socket.close()
                raise ServerSetupError(f"the HTTP server on {self.address} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("http_stop_timeout", seconds=timeout_s)
        self.socket.close()


def open_http(config: Config, paths: Paths) -> HttpServer | None:
    """Bind and start the HTTP API per server.http_address (None when it is off). It answers
    503 until `attach` and `start_serving`."""
    from speclora.daemon.http.app import HttpApi

    s = config.server
    if not s.http_address:
        return None
    address = check_tcp_address(s.http_address, s.allow_non_loopback, key="http_address")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    loopback = is_loopback(host)
    key = http_api_key(config, paths, loopback)
    # A client off loopback addresses us by this name; a wildcard bind has none of its own.
    hosts = [*s.http_allowed_hosts]
    if not loopback and host not in ("0.0.0.0", "::"):
        hosts.append(host)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, int(port)), family=family)
    except OSError as exc:
        raise ServerSetupError(
            f"cannot listen on {address} for HTTP: {exc.strerror or exc}. Set "
            "server.http_address to a free port, or null to turn the HTTP API off"
        ) from None
    api = HttpApi(config, api_key=key, allowed_hosts=hosts)
    server = HttpServer(api, sock).start()
    log.info("http_listening", url=server.url, api_key=key is not None)
    return server


# ---------------------------------------------------------------------- the server


class HealthServicer(health.HealthServicer):
    """grpc's health service, plus ending its Watch streams at shutdown: grpc's stop would hold
    an open Watch for its whole margin and then cancel it (the client saw CANCELLED, and the
    daemon's exit waited). Only grpc_health's public API is used: Watch is overridden to keep
    our own record of each open stream's send callback."""

    def __init__(self, experimental_non_blocking: bool = True) -> None:
        super().__init__(experimental_non_blocking=experimental_non_blocking)
        self._watches: set[Callable[[Any], None]] = set()
        self._watches_lock = threading.Lock()

    def Watch(  # noqa: N802 (grpc's method name)
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        if send_response_callback is not None:  # grpc's non-blocking mode, which we ask for
            with self._watches_lock:
                self._watches.add(send_response_callback)
            context.add_callback(lambda: self._forget(send_response_callback))
        return super().Watch(request, context, send_response_callback)

    def _forget(self, send: Callable[[Any], None]) -> None:
        with self._watches_lock:
            self._watches.discard(send)

    def close_watches(self) -> None:
        """End every open Watch cleanly; each watcher has already been sent NOT_SERVING."""
        with self._watches_lock:
            watches = list(self._watches)
            self._watches.clear()
        for send in watches:
            send(None)  # None ends the stream (grpc's send_response_callback convention)


class DaemonServer:
    """A bound grpc server plus what shutting it down cleanly needs."""

    def __init__(
        self,
        server: grpc.Server,
        servicer: SpecLoRAServicer,
        health_servicer: HealthServicer,
        worker: Worker,
        socket_path: Path,
        tcp_address: str | None,
        http: HttpServer | None = None,
    ) -> None:
        self.grpc_server = server
        self.servicer = servicer
        self.health = health_servicer
        self.worker = worker
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.http = http

    @property
    def http_address(self) -> str | None:
        """host:port the HTTP API listens on (the real port when configured as 0)."""
        return self.http.address if self.http else None

    def start(self) -> None:
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.http is not None:
            self.http.api.start_serving()

    def shutdown(self, grace_s: float) -> bool:
        """Refuse new calls, let streams finish for up to `grace_s`, then cancel the rest.
        Returns True when every stream finished on its own."""
        log.info("shutdown_started", grace_s=grace_s, active=self.worker.active_count)
        # Refuse first, then say NOT_SERVING: a client that sees NOT_SERVING and calls at once
        # must get UNAVAILABLE, not a request that slipped in between the two.
        self.servicer.begin_shutdown()
        if self.http is not None:
            self.http.api.begin_shutdown()
        self.health.enter_graceful_shutdown()
        # grpc keeps accepting during the drain so that late calls reach our servicer and get a
        # clear UNAVAILABLE; a stopped grpc server would cancel them (CANCELLED) instead.
        drained = self.worker.drain(grace_s)
        self.worker.stop()
        self.health.close_watches()
        stopped = self.grpc_server.stop(_STOP_MARGIN_S)
        stopped.wait()
        if self.http is not None:
            self.http.stop()
        if self.socket_path.is_socket():
            self.socket_path.unlink()
        log.info("shutdown_finished", drained=drained)
        return drained


def create_server(
    config: Config,
    worker: Worker,
    *,
    learning: LearningLoop | None = None,
    paths: Paths | None = None,
    http: HttpServer | None = None,
) -> tuple[DaemonServer, str]:
    """Build and bind the server (not started). Returns it and the Unix address to dial.

    The HTTP API comes with it: `http` when the caller opened it already (serve opens it
    before loading models), else opened here per server.http_address."""
    paths = paths or resolve_paths()
    opened = http is None
    if http is None:
        http = open_http(config, paths)
    try:
        server = _create_grpc_server(config, worker, learning, paths, http)
    except BaseException:
        if opened and http is not None:
            http.stop()
        raise
    if http is not None:
        counts = learning.failure_counts if learning else None

        def snapshot() -> StatsSnapshot:  # the one the Stats RPC assembles
            return daemon_snapshot(worker, config.speculation.mode, counts)  # type: ignore[arg-type]

        http.api.attach(worker, snapshot)
    return server, f"unix:{server.socket_path}"


def _create_grpc_server(
    config: Config,
    worker: Worker,
    learning: LearningLoop | None,
    paths: Paths,
    http: HttpServer | None,
) -> DaemonServer:
    s = config.server
    socket_path = socket_path_for(config, paths)
    ensure_private_dir(socket_path.parent)
    capacity = s.max_active + s.queue_size + _EXTRA_RPCS
    interceptors = []
    tcp = None
    if s.tcp_address:
        tcp = check_tcp_address(s.tcp_address, s.allow_non_loopback)
        interceptors.append(TokenAuthInterceptor(ensure_token(paths.token_file)))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        # Past this many in-flight calls grpc answers RESOURCE_EXHAUSTED instead of queueing.
        maximum_concurrent_rpcs=capacity,
    )
    servicer = SpecLoRAServicer(worker, config, learning)
    add_to_server(servicer, server)
    health_servicer = HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"unix:{socket_path}"
    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ServerSetupError(f"cannot listen on {socket_path}: {exc}") from None
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    if tcp is not None:
        try:
            port = server.add_insecure_port(tcp)
        except RuntimeError as exc:
            raise ServerSetupError(f"cannot listen on {tcp}: {exc}") from None
        tcp = f"{tcp.rpartition(':')[0]}:{port}"
    return DaemonServer(server, servicer, health_servicer, worker, socket_path, tcp, http)


# ---------------------------------------------------------------------- serve


def serve(config: Config, paths: Paths | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; the process exit code."""
    from speclora.daemon.blas import log_blas, per_product_scratch_bytes  # before mlx
    from speclora.daemon.memory import tune_malloc

    # Before any model is loaded or any thread starts.
    malloc = tune_malloc(heap_buffer_bytes=per_product_scratch_bytes())
    paths = paths or resolve_paths()
    log.info("daemon_starting", version=speclora.__version__, pid=os.getpid(), malloc=malloc)
    lock = InstanceLock(paths.lock_file).acquire()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop_requested.is_set():  # a second Ctrl-C: the user does not want to wait
            log.warning("shutdown_forced", signal=name)
            sys.stderr.flush()
            os._exit(1)
        stop_requested.set()
        log.info("shutdown_requested", signal=name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime = None
    http: HttpServer | None = None  # ours to stop until the DaemonServer owns it
    try:
        if config.server.tcp_address:  # refuse a bad address before minutes of model loading
            check_tcp_address(config.server.tcp_address, config.server.allow_non_loopback)
        # HTTP listens from here on: a taken port fails now, and clients see 503 while loading.
        http = open_http(config, paths)
        log_blas()
        # Imported after the lock: a refused second instance should not pay for mlx-lm.
        from speclora.daemon.runtime import build_runtime

        runtime = build_runtime(config, paths)
        if stop_requested.is_set():
            return 0
        server, address = create_server(
            config, runtime.worker, learning=runtime.learning, paths=paths, http=http
        )
        http = None
        server.start()
        log.info(
            "daemon_ready",
            address=address,
            tcp=server.tcp_address,
            http=server.http.url if server.http else None,
            target=runtime.worker.hub.target_name,
            draft=runtime.worker.hub.draft_name,
            pid=os.getpid(),
        )
        while not stop_requested.wait(1.0):
            if not runtime.worker.alive:
                log.error("worker_died", hint="exiting non-zero so the supervisor restarts us")
                server.shutdown(0)
                return 1
        server.shutdown(config.server.shutdown_grace_s)
        return 0
    finally:
        if http is not None:
            http.stop()
        if runtime is not None:
            runtime.close()
        lock.release()
        log.info("daemon_exited")
        sys.stderr.flush()
