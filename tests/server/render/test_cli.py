"""`megaportrait render-node keygen | trust-site | serve`: keys on disk, and a served node reachable over mTLS."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from megaportrait.protos import render_pb2 as pb
from megaportrait.server.render.payloads import TrustedSites
from megaportrait.server.render.service import TLSFiles, client_channel, stub
from megaportrait.shared import pki
from megaportrait.shared.cli import app
from megaportrait.shared.crypto import NodePublicKeys, ed25519_public_pem


REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keygen_and_trust_site(tmp_path):
    runner = CliRunner()
    state = tmp_path / "state"
    result = runner.invoke(app, ["render-node", "keygen", "--state-dir", str(state), "--node-id", "node-7"])
    assert result.exit_code == 0, result.output
    public = NodePublicKeys.load(state / "node_public.json")
    assert public.node_id == "node-7" and public.hpke.fingerprint() in result.output
    assert stat.S_IMODE((state / "keys" / "node_hpke.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "keys" / "node_signing.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "keys" / "store.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "keys").stat().st_mode) == 0o700
    again = runner.invoke(app, ["render-node", "keygen", "--state-dir", str(state)])
    assert again.exit_code != 0 and isinstance(again.exception, FileExistsError)

    site = Ed25519PrivateKey.generate()
    (tmp_path / "site.pem").write_bytes(ed25519_public_pem(site))
    result = runner.invoke(app, ["render-node", "trust-site", "--state-dir", str(state), "--site-id", "site-a", "--key", str(tmp_path / "site.pem")])
    assert result.exit_code == 0, result.output
    trusted = TrustedSites.load(state / "trusted_sites")
    assert list(trusted.keys) == ["site-a"] and len(trusted.keys["site-a"]) == 1


def test_serve_answers_over_mtls_serves_health_and_stops_on_sigterm(tmp_path):
    state, tls_dir = tmp_path / "state", tmp_path / "pki"
    assert CliRunner().invoke(app, ["render-node", "keygen", "--state-dir", str(state)]).exit_code == 0
    pki.init_pki(tls_dir, servers={"render-node": ("localhost", "127.0.0.1")}, clients=("site-a",))
    health_port = _free_port()
    config = tmp_path / "render-node.yaml"
    config.write_text(f"policy:\n  consent_file: {REPO / 'policies' / 'consent.yaml'}\n  retention_file: {REPO / 'policies' / 'retention.yaml'}\n"
                      f"health:\n  listen: 127.0.0.1:{health_port}\n")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", "from megaportrait.shared.cli import app; app()", "render-node", "serve", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--tls-dir", str(tls_dir), "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    try:
        port = None
        deadline = time.time() + 60
        lines = []
        while port is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving on port" in line:
                port = int(line.split("serving on port")[1].split()[0])
        assert port, "".join(lines)
        # no diffusion_base_model configured: the node says plainly that its diffusion output is not a portrait
        assert any("tiny embedded test model" in line and "NOT a portrait" in line for line in lines), "".join(lines)
        channel = client_channel(f"localhost:{port}", TLSFiles.from_dir(tls_dir, "site-a"))
        info = stub(channel).GetNodeInfo(pb.NodeInfoRequest(), timeout=30)
        assert info.node_id == "render-node" and info.default_backend == "classic"
        assert info.hpke_fingerprint == NodePublicKeys.load(state / "node_public.json").hpke.fingerprint()
        channel.close()
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            stub(plain).GetNodeInfo(pb.NodeInfoRequest(), timeout=5)
            raise AssertionError("a plaintext client was served")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=10).read())
        assert health["status"] == "ok" and {c["name"] for c in health["checks"]} >= {"job_store", "audit_log", "retention"}
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=10).read().decode()
        assert 'megaportrait_build_info{service="render-node"' in metrics and "megaportrait_render_queue_depth 0.0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
        # the node kept its own signed log in its state dir, and `megaportrait audit verify` accepts it
        log = state / "audit" / "audit.jsonl"
        result = CliRunner().invoke(app, ["audit", "verify", str(log), "--public-key", str(state / "audit" / "signing.key.pub")])
        assert result.exit_code == 0, result.output
        actions = [json.loads(line)["action"] for line in log.read_text().splitlines()]
        assert actions == ["node.start", "retention.sweep", "node.stop"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_trust_site_takes_the_public_key_file_audit_keygen_writes(tmp_path):
    """The site's key command writes `<key>.pub` as hex; the node operator passes that file as it is."""
    runner = CliRunner()
    state = tmp_path / "state"
    assert runner.invoke(app, ["render-node", "keygen", "--state-dir", str(state)]).exit_code == 0
    result = runner.invoke(app, ["audit", "keygen", str(tmp_path / "site" / "signing.key")])
    assert result.exit_code == 0, result.output
    pub = tmp_path / "site" / "signing.key.pub"
    result = runner.invoke(app, ["render-node", "trust-site", "--state-dir", str(state), "--site-id", "alpha",
                                 "--key", str(pub)])
    assert result.exit_code == 0, result.output
    trusted = TrustedSites.load(state / "trusted_sites")
    assert list(trusted.keys) == ["alpha"]
    (tmp_path / "garbage.pub").write_text("not a key\n")
    result = runner.invoke(app, ["render-node", "trust-site", "--state-dir", str(state), "--site-id", "beta",
                                 "--key", str(tmp_path / "garbage.pub")])
    assert result.exit_code == 2 and "signing.key" not in result.output and "64 hex characters" in result.output
    assert list(TrustedSites.load(state / "trusted_sites").keys) == ["alpha"]
