"""Start the services from deploy/'s own definitions on loopback, check they answer, stop them.

Each command is the ExecStart of a systemd unit (or a compose `command`) as written; conftest.Sandbox only maps
the install prefixes to this checkout and a temp dir, and the well-known ports to free loopback ports. The setup
steps are the ones the docs give an operator: `megaportrait pki init`, `megaportrait render-node keygen`,
`megaportrait audit keygen`, `megaportrait coordinator register`.
"""
from __future__ import annotations

import json
import subprocess
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

from megaportrait.shared import service_health

pytestmark = pytest.mark.timeout(180)

START_TIMEOUT = 60.0


def _megaportrait(box, *args: str, env=None) -> subprocess.CompletedProcess:
    out = box.run([str(_venv_bin(box) / "megaportrait"), *args], env=env)
    assert out.returncode == 0, f"megaportrait {' '.join(args)}: {out.stdout}{out.stderr}"
    return out


def _venv_bin(box) -> Path:
    return Path(box.base_env()["PATH"].split(":")[0])


def _pki(box, sites: str = "alpha") -> Path:
    out = box.root / "pki"
    _megaportrait(box, "pki", "init", "--out", str(out), "--sites", sites)
    return out


def _wait(target: str, svc, timeout: float = START_TIMEOUT) -> str:
    try:
        return service_health.wait_healthy(target, timeout=timeout, alive=svc.alive)
    except service_health.HealthEndpointError as exc:
        raise AssertionError(f"{svc.name}: {exc}\n--- its output ---\n{svc.output()}") from None


def _wait_http_answer(url: str, svc, timeout: float = START_TIMEOUT) -> int:
    """Wait until `url` answers at all (any HTTP status); return the status."""
    import time
    import urllib.error

    deadline = time.monotonic() + timeout
    while True:
        if not svc.alive():
            raise AssertionError(f"{svc.name} exited: {svc.output()}")
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise AssertionError(f"{svc.name}: {url} not answering after {timeout} s: {svc.output()}") from None
            time.sleep(0.25)


# ------------------------------------------------------------------------------------------------- render node


def _render_node_call(box, pki: Path):
    """GetNodeInfo over mutual TLS with site alpha's certificate: the node is up and admits CA-signed sites."""
    from megaportrait.protos import render_pb2 as pb
    from megaportrait.server.render.service import TLSFiles, client_channel, stub

    tls = TLSFiles.from_dir(pki / "sites" / "alpha", "alpha")
    with client_channel(f"localhost:{box.port(50051)}", tls) as channel:
        return stub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=5, wait_for_ready=True)


def _wait_render_node(box, pki, svc, timeout: float = START_TIMEOUT):
    import time

    import grpc

    deadline = time.monotonic() + timeout
    while True:
        if not svc.alive():
            raise AssertionError(f"render node exited: {svc.output()}")
        try:
            return _render_node_call(box, pki)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise AssertionError(f"render node not answering after {timeout} s: {svc.output()}") from None
            time.sleep(0.3)


def _prepare_render_node(box) -> Path:
    pki = _pki(box)
    box.install(pki / "render-node", "/etc/megaportrait/pki/render-node")
    box.install(_deploy() / "render-node" / "render-node.yaml", "/etc/megaportrait/render-node.yaml", rewrite=True)
    box.install(_repo() / "policies", "/etc/megaportrait/policies")
    _megaportrait(box, "render-node", "keygen", "--state-dir", str(box.host_path("/var/lib/megaportrait/render-node")))
    return pki


def _deploy() -> Path:
    return Path(__file__).resolve().parents[2] / "deploy"


def _repo() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def render_node_from_unit(defs, tmp_path_factory):
    box = defs.Sandbox(tmp_path_factory.mktemp("render-unit"))
    try:
        pki = _prepare_render_node(box)
        svc = box.start_unit(defs.DEPLOY / "render-node" / "megaportrait-render-node.service")
        info = _wait_render_node(box, pki, svc)
        yield box, svc, info
    finally:
        box.close()


def test_render_node_starts_from_its_systemd_unit(render_node_from_unit):
    box, svc, info = render_node_from_unit
    assert info.node_id == "render-node"
    assert {"classic", "diffusion"} <= set(info.backends)
    assert len(info.hpke_public_key) > 1000  # ML-KEM-768 + X25519
    assert box.stop(svc) == 0, svc.output()  # SIGTERM (systemctl stop) ends it cleanly


def test_render_node_serves_health_and_metrics_where_its_config_says(defs, tmp_path):
    box = defs.Sandbox(tmp_path)
    try:
        pki = _prepare_render_node(box)
        svc = box.start_unit(defs.DEPLOY / "render-node" / "megaportrait-render-node.service")
        _wait_render_node(box, pki, svc)
        url = f"http://127.0.0.1:{box.port(9464)}"
        service_health.wait_healthy(url + "/healthz", timeout=5, alive=svc.alive)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert 'megaportrait_build_info{service="render-node"' in metrics
    finally:
        box.close()


def test_render_node_starts_from_its_compose_command(defs, tmp_path):
    box = defs.Sandbox(tmp_path)
    try:
        pki = _prepare_render_node(box)
        svc_def = defs.load_compose(defs.DEPLOY / "render-node" / "compose.yaml")["services"]["render-node"]
        env = box.base_env() | {k: str(v) for k, v in svc_def.get("environment", {}).items()}
        svc = box.start("render-node-compose", box.relocate_argv(svc_def["command"]), env)
        info = _wait_render_node(box, pki, svc)
        assert info.default_backend
    finally:
        box.close()


# --------------------------------------------------------------------------------- coordinator + site (Flower)


@pytest.fixture(scope="module")
def federation(defs, tmp_path_factory):
    """SuperLink from the coordinator's unit, site alpha's key registered, SuperNode from the site's unit."""
    box = defs.Sandbox(tmp_path_factory.mktemp("federation"))
    try:
        pki = _pki(box)
        box.install(pki / "coordinator", "/etc/megaportrait/pki/coordinator")
        box.install(pki / "sites" / "alpha", "/etc/megaportrait/pki/site")
        box.install(defs.DEPLOY / "coordinator" / "coordinator.yaml", "/etc/megaportrait/coordinator.yaml", rewrite=True)
        box.install(defs.DEPLOY / "site-client" / "site.yaml", "/etc/megaportrait/site.yaml", rewrite=True)
        site_env = box.install(defs.DEPLOY / "site-client" / "site.env", "/etc/megaportrait/site.env", rewrite=True)
        site_env.write_text(site_env.read_text().replace("coordinator.example.org", "localhost"))
        flwr_home = box.install(defs.DEPLOY / "coordinator" / "flwr" / "config.toml", "/etc/megaportrait/flwr/config.toml", rewrite=True).parent

        link = box.start_unit(defs.DEPLOY / "coordinator" / "megaportrait-superlink.service")
        _wait(f"grpc://127.0.0.1:{box.port(9098)}", link)
        env = box.base_env() | {"FLWR_HOME": str(flwr_home)}
        # the coordinator's own command reads the pki folder as its --credentials
        reg = box.run([str(defs.VENV_BIN / "megaportrait"), "coordinator", "register", "--credentials", str(pki / "coordinator"),
                       "--address", f"127.0.0.1:{box.port(9093)}", "--state-dir", str(box.root / "coordinator-state"), "--site", "alpha"])
        assert reg.returncode == 0, reg.stdout + reg.stderr + link.output()
        node = box.start_unit(defs.DEPLOY / "site-client" / "megaportrait-supernode.service")
        _wait(f"grpc://127.0.0.1:{box.port(9099)}", node)
        yield box, link, node, env
    finally:
        box.close()


def test_site_supernode_joins_the_coordinator_over_tls_with_its_node_key(federation, defs):
    box, link, node, env = federation
    import time

    deadline = time.monotonic() + 30
    while True:
        ls = box.run([str(defs.VENV_BIN / "flwr"), "supernode", "ls", "--format", "json"], env=env)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        nodes = json.loads(ls.stdout).get("nodes", [])
        if any(n.get("status") == "online" for n in nodes):
            break
        assert time.monotonic() < deadline, f"no online SuperNode: {ls.stdout}\n{node.output()}"
        time.sleep(1)
    assert (box.host_path("/var/lib/megaportrait/site") / "photos").is_dir()  # run-supernode.sh made the data dir


def test_health_bridges_start_from_their_units_and_follow_the_upstream(federation, defs):
    box, link, node, env = federation
    bridge = box.start_unit(defs.DEPLOY / "coordinator" / "megaportrait-superlink-health.service")
    url = f"http://127.0.0.1:{box.port(9464)}"
    _wait(url + "/healthz", bridge)
    metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    assert 'megaportrait_upstream_up{upstream="grpc://127.0.0.1:' in metrics and "} 1.0" in metrics
    assert 'megaportrait_build_info{service="superlink"' in metrics
    # the container HEALTHCHECK of the coordinator image probes the same gRPC health service
    compose = defs.load_compose(defs.DEPLOY / "coordinator" / "compose.yaml")
    check = [box.relocate(a) for a in compose["services"]["superlink"]["healthcheck"]["test"][1:]]
    assert box.run([str(defs.VENV_BIN / check[0]), *check[1:]]).returncode == 0
    box.stop(bridge)

    # the site's bridge (same host port in this sandbox, so one at a time) reports the SuperNode going away
    site_bridge = box.start_unit(defs.DEPLOY / "site-client" / "megaportrait-supernode-health.service")
    _wait(url + "/healthz", site_bridge)
    assert box.stop(node) is not None
    with pytest.raises(service_health.HealthEndpointError, match="503"):
        service_health.probe(url + "/healthz")
    box.stop(site_bridge)


# ------------------------------------------------------------------------------------------------ audit review


def test_audit_review_page_starts_from_its_unit_and_shows_verified_logs(defs, tmp_path):
    from megaportrait.server.audit_review import hash_password
    from megaportrait.shared import audit

    box = defs.Sandbox(tmp_path)
    try:
        keys = box.host_path("/etc/megaportrait/audit-keys")
        logs = box.host_path("/var/lib/megaportrait/audit-review/logs")
        for component in ("render-node", "coordinator"):
            writer_key = box.root / "writers" / f"{component}.key"
            _megaportrait(box, "audit", "keygen", str(writer_key))
            keys.mkdir(parents=True, exist_ok=True)
            (keys / f"{component}.pub").write_bytes(Path(f"{writer_key}.pub").read_bytes())
            log = audit.AuditLog(logs / f"{component}.jsonl", audit.load_signing_key(writer_key), component=component, fsync=False)
            log.append(f"test.{component}.started", actor="deploy-test")
            log.checkpoint()
        cfg = yaml.safe_load((defs.DEPLOY / "coordinator" / "audit-review.yaml").read_text())
        cfg["policy"]["reviewers"] = {"alice": hash_password("correct horse")}
        dest = box.host_path("/etc/megaportrait/audit-review.yaml")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(box.relocate(yaml.safe_dump(cfg)))

        svc = box.start_unit(defs.DEPLOY / "coordinator" / "megaportrait-audit-review.service")
        url = f"http://127.0.0.1:{box.port(8088)}/"
        assert _wait_http_answer(url, svc) == 401  # up, and refuses strangers
        req = urllib.request.Request(url, headers={"Authorization": "Basic " + b64encode(b"alice:correct horse").decode()})
        page = urllib.request.urlopen(req, timeout=10).read().decode()
        assert "test.render-node.started" in page and "test.coordinator.started" in page
    finally:
        box.close()


def test_audit_review_healthcheck_of_the_compose_service_passes(defs, tmp_path):
    from megaportrait.server.audit_review import hash_password

    box = defs.Sandbox(tmp_path)
    try:
        logs = box.host_path("/var/lib/megaportrait/audit-review/logs")
        logs.mkdir(parents=True)
        for component in ("render-node", "coordinator"):
            _megaportrait(box, "audit", "keygen", str(box.host_path(f"/etc/megaportrait/audit-keys/{component}")))
            Path(f"{box.host_path(f'/etc/megaportrait/audit-keys/{component}')}.pub").rename(box.host_path(f"/etc/megaportrait/audit-keys/{component}.pub"))
            (logs / f"{component}.jsonl").touch()
        cfg = yaml.safe_load((defs.DEPLOY / "coordinator" / "audit-review.yaml").read_text())
        cfg["policy"]["reviewers"] = {"alice": hash_password("x")}
        box.host_path("/etc/megaportrait/audit-review.yaml").write_text(yaml.safe_dump(cfg))
        svc_def = defs.load_compose(defs.DEPLOY / "coordinator" / "compose.yaml")["services"]["audit-review"]
        env = box.base_env() | {k: box.relocate(str(v)) for k, v in svc_def["environment"].items()}
        svc = box.start("audit-review-compose", box.relocate_argv(svc_def["command"]), env)
        check = [box.relocate(a) for a in svc_def["healthcheck"]["test"][1:]]
        _wait_http_answer(f"http://127.0.0.1:{box.port(8088)}/", svc)
        assert box.run([str(defs.VENV_BIN / check[0]), *check[1:]]).returncode == 0
    finally:
        box.close()


# ------------------------------------------------------------------------------------------------- site sweep


def test_site_sweep_unit_deletes_expired_site_data_and_audits_it(defs, tmp_path, people):
    """The sweep unit's own command, on a site laid out as site.yaml and run-supernode.sh say, with the consent
    ledger and key an operator records first."""
    import os
    import shutil
    import time

    from megaportrait.client.federation import SiteConsent, record_federated_consent
    from megaportrait.shared import audit

    box = defs.Sandbox(tmp_path)
    box.install(defs.DEPLOY / "site-client" / "site.yaml", "/etc/megaportrait/site.yaml", rewrite=True)
    box.install(defs.DEPLOY / "site-client" / "site.env", "/etc/megaportrait/site.env", rewrite=True)
    box.install(_repo() / "policies", "/etc/megaportrait/policies")
    policy = yaml.safe_load(box.host_path("/etc/megaportrait/site.yaml").read_text())["policy"]
    consent = SiteConsent(Path(policy["consent_ledger"]), Path(policy["audit_key"]), Path(policy["audit_log"]))
    record_federated_consent(consent, "alpha", ["person-a", "person-b"], actor="deploy-test")
    site = box.host_path("/var/lib/megaportrait/site")
    old, new = site / "photos" / "person-a" / "old.jpg", site / "photos" / "person-b" / "new.jpg"
    for src, dest in ((people["obama"][0], old), (people["biden"][0], new)):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (site / "federation").mkdir()
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))

    argv, env, cwd = box.unit_command(defs.parse_unit(defs.DEPLOY / "site-client" / "megaportrait-site-sweep.service"))
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 deleted, 0 failed" in out.stdout and not old.exists() and new.is_file()
    entries = [e for e in audit.read_entries(consent.audit_log) if e.action == "retention.delete"]
    assert [(e.actor, e.person, e.detail["kind"]) for e in entries] == [("retention:site:alpha", "person-a", "source_photos")]
    assert audit.verify(consent.audit_log, audit.load_signing_key(consent.key).public_key()).ok
