"""shared.service_health: /healthz follows the service's checks, /metrics is its own registry, probes say why."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter

from megaportrait.shared import service_health as sh


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_healthz_and_metrics_reflect_checks_and_the_callers_registry():
    registry = sh.new_registry("render-node", version="9.9.9")
    jobs = Counter("megaportrait_render_jobs", "Jobs finished.", ["outcome"], registry=registry)
    jobs.labels("succeeded").inc(3)
    disk_full = {"value": False}

    def disk() -> None:
        if disk_full["value"]:
            raise OSError("state dir has 0 bytes free")

    with sh.start("127.0.0.1:0", registry, service="render-node", checks={"disk": disk, "keys": lambda: None}) as server:
        status, ctype, body = _get(server.url + "/healthz")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body) == {
            "service": "render-node", "status": "ok",
            "checks": [{"name": "disk", "ok": True, "detail": ""}, {"name": "keys", "ok": True, "detail": ""}],
        }
        disk_full["value"] = True
        status, _, body = _get(server.url + "/healthz")
        assert status == 503
        failing = [c for c in json.loads(body)["checks"] if not c["ok"]]
        assert failing == [{"name": "disk", "ok": False, "detail": "OSError: state dir has 0 bytes free"}]

        status, ctype, metrics = _get(server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert 'megaportrait_render_jobs_total{outcome="succeeded"} 3.0' in metrics
        assert 'megaportrait_build_info{service="render-node",version="9.9.9"} 1.0' in metrics
        assert 'megaportrait_health_check_ok{check="disk"} 0.0' in metrics
        assert 'megaportrait_health_check_ok{check="keys"} 1.0' in metrics
        assert _get(server.url + "/other")[0] == 404
    with pytest.raises(sh.HealthEndpointError, match="unreachable"):
        sh.probe(server.url + "/healthz", timeout=1)


def test_two_services_in_one_process_keep_separate_registries():
    a, b = sh.new_registry("a"), sh.new_registry("b")
    Counter("megaportrait_only_in_a", "x", registry=a).inc()
    with sh.start("127.0.0.1:0", a, service="a") as sa, sh.start("[::1]:0", b, service="b") as sb:
        assert "megaportrait_only_in_a" in _get(sa.url + "/metrics")[2]
        assert "megaportrait_only_in_a" not in _get(sb.url + "/metrics")[2]
        assert sb.url.startswith("http://[::1]:")


def test_start_refuses_a_bad_or_taken_address():
    with pytest.raises(sh.HealthEndpointError, match="host:port"):
        sh.start("9464", sh.new_registry("x"), service="x")
    with sh.start("127.0.0.1:0", sh.new_registry("x"), service="x") as first:
        with pytest.raises(sh.HealthEndpointError, match=f"127.0.0.1:{first.port}"):
            sh.start(f"127.0.0.1:{first.port}", sh.new_registry("y"), service="y")


def test_probe_speaks_grpc_health_and_reports_not_serving():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert sh.probe(f"grpc://127.0.0.1:{port}").endswith("SERVING")
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(sh.HealthEndpointError, match="NOT_SERVING"):
            sh.probe(f"grpc://127.0.0.1:{port}")
    finally:
        server.stop(0)
    with pytest.raises(sh.HealthEndpointError, match="UNAVAILABLE"):
        sh.probe(f"grpc://127.0.0.1:{port}", timeout=1)
    with pytest.raises(sh.HealthEndpointError, match="must start with"):
        sh.probe("127.0.0.1:1")


def test_wait_healthy_stops_when_the_process_died():
    with pytest.raises(sh.HealthEndpointError, match="exited"):
        sh.wait_healthy("http://127.0.0.1:9/healthz", timeout=10, alive=lambda: False)
