"""A tiny HTTP endpoint for a long-running service: `/healthz` (its checks) and `/metrics` (Prometheus text).

A service builds its own registry (`new_registry`), registers its metrics on it, and calls `start(listen, registry,
checks=...)`; nothing here is global except what the caller passes in. The server runs on a daemon thread and
answers only GET; it never reads request bodies, so exposing it to a scraper leaks nothing but the metrics.

`probe` is the client side: container HEALTHCHECKs and tests call it on `http://host:port/healthz` or on a gRPC
health service (`grpc://host:port`, e.g. Flower's `--health-server-address`).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Info, ProcessCollector, generate_latest

from .errors import MegaPortraitError

log = logging.getLogger("megaportrait.health")

Check = Callable[[], None]
"""A health check: returns when healthy, raises (any exception; its message is shown) when not."""


class HealthEndpointError(MegaPortraitError):
    """The health endpoint cannot start (bad listen address, port taken) or a probe found the service unhealthy."""

    reason = "health_unavailable"


def wait_until_terminated() -> None:
    """Block the main thread until SIGTERM or Ctrl-C: how every long-running service command waits."""
    import signal

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:9464') -> (host, port); port 0 asks the OS for a free one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise HealthEndpointError(f"listen address {listen!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host.strip("[]"), int(port)


def new_registry(service: str, version: str | None = None) -> CollectorRegistry:
    """A fresh registry holding process metrics (CPU, memory, fds) and `megaportrait_build_info{service,version}`."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _v

        try:
            version = _v("megaportrait")
        except PackageNotFoundError:
            version = "unknown"
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    Info("megaportrait_build", "The running MegaPortrait service and version.", registry=registry).info(
        {"service": service, "version": version}
    )
    return registry


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


def run_checks(checks: Mapping[str, Check]) -> list[CheckResult]:
    """Run every check (none short-circuits the others) and say which failed and why."""
    results = []
    for name, check in checks.items():
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - a failing check of any kind is reported, never raised
            results.append(CheckResult(name, False, f"{type(exc).__name__}: {exc}"))
        else:
            results.append(CheckResult(name, True))
    return results


@dataclass
class HealthServer:
    """A running endpoint; `stop()` shuts it down and joins its thread."""

    service: str
    host: str
    port: int
    _httpd: ThreadingHTTPServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HealthServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    listen: str,
    registry: CollectorRegistry,
    *,
    service: str,
    checks: Mapping[str, Check] | None = None,
) -> HealthServer:
    """Serve `/healthz` and `/metrics` for `service` on `listen` ('host:port') from a daemon thread.

    `/healthz` answers 200 with JSON `{"service", "status": "ok", "checks": [...]}` when every check passes and 503
    with the failing checks' reasons otherwise. `/metrics` is `registry` in the Prometheus text format, plus
    `megaportrait_health_check_ok{check}` gauges updated on every `/healthz` or scrape.
    """
    host, port = parse_listen(listen)
    checks = dict(checks or {})
    check_gauge = Gauge(
        "megaportrait_health_check_ok", "1 when the named health check passed at the last probe or scrape.", ["check"], registry=registry
    )

    def evaluate() -> list[CheckResult]:
        results = run_checks(checks)
        for r in results:
            check_gauge.labels(r.name).set(1 if r.ok else 0)
        return results

    class Handler(BaseHTTPRequestHandler):
        server_version = "megaportrait-health"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                results = evaluate()
                ok = all(r.ok for r in results)
                body = json.dumps(
                    {"service": service, "status": "ok" if ok else "failing", "checks": [r.__dict__ for r in results]}
                ).encode()
                self._send(200 if ok else 503, "application/json", body)
            elif path == "/metrics":
                evaluate()
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - overrides http.server
            log.debug("%s %s", self.address_string(), format % args)

    try:
        httpd = (_Server6 if ":" in host else _Server)((host, port), Handler)
    except OSError as exc:
        raise HealthEndpointError(f"cannot serve /healthz on {listen}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=httpd.serve_forever, name=f"health-{service}", daemon=True)
    thread.start()
    bound_port = httpd.server_address[1]
    log.info("%s: /healthz and /metrics on %s:%d", service, host, bound_port)
    return HealthServer(service, host, bound_port, httpd, thread)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def probe(target: str, *, timeout: float = 3.0) -> str:
    """Check one health endpoint; return a one-line description when healthy, raise HealthEndpointError if not.

    `target` is `http(s)://host:port/path` (2xx is healthy) or `grpc://host:port[/service]` (the standard gRPC
    health protocol, SERVING is healthy; no TLS, as Flower's health server and ours are loopback-only).
    """
    if target.startswith("grpc://"):
        return _probe_grpc(target.removeprefix("grpc://"), timeout)
    if not target.startswith(("http://", "https://")):
        raise HealthEndpointError(f"probe target {target!r} must start with http://, https:// or grpc://")
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            return f"{target}: HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors="replace")
        raise HealthEndpointError(f"{target}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise HealthEndpointError(f"{target}: unreachable: {getattr(exc, 'reason', exc)}") from None


def _probe_grpc(address: str, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address, _, service = address.partition("/")
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise HealthEndpointError(f"grpc://{address}: {exc.code().name}: {exc.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise HealthEndpointError(f"grpc://{address}/{service}: {status}")
    return f"grpc://{address}/{service}: {status}"


def wait_healthy(target: str, *, timeout: float = 60.0, interval: float = 0.25, alive: Callable[[], bool] | None = None) -> str:
    """Probe `target` until healthy or `timeout` seconds pass; `alive()` False (e.g. the process exited) stops early."""
    deadline = time.monotonic() + timeout
    last = "never probed"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise HealthEndpointError(f"{target}: the service exited before it became healthy (last: {last})")
        try:
            return probe(target, timeout=min(3.0, max(0.5, deadline - time.monotonic())))
        except HealthEndpointError as exc:
            last = str(exc)
        time.sleep(interval)
    raise HealthEndpointError(f"{target}: not healthy after {timeout:.0f} s (last: {last})")
