"""Fixture `loopback_site`: a fresh temporary site and a real render node on loopback (mutual TLS), laid out as deploy/docs/site-client.md
says: PKI from `megaportrait pki init`, node keys from `render-node keygen`, the site's settings from
deploy/site-client/site.yaml with /etc/megaportrait and /var/lib/megaportrait moved into the temp folder."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
SITE_ID = "alpha"


@dataclass
class LoopbackSite:
    """The temp site's folders, its settings file and the running node (stop with `stop()`)."""

    root: Path
    etc: Path
    var: Path
    config: Path
    node_state: Path
    node: object
    server: object
    port: int
    tls: object = None

    def substitute(self, text: str) -> str:
        return text.replace("/etc/megaportrait", str(self.etc)).replace("/var/lib/megaportrait", str(self.var))

    def stop(self) -> None:
        self.server.stop(None)
        self.node.stop()

    def cli(self, *args: str, ok: bool = True):
        """`megaportrait ARGS` in-process with this site's settings; asserts success unless `ok` is False."""
        from megaportrait.shared.cli import app

        result = CliRunner().invoke(app, list(args), env={"MEGAPORTRAIT_CONFIG": str(self.config)})
        if ok:
            assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    def restart_server(self) -> None:
        """The node's gRPC server again on the same port (after `server.stop`)."""
        from megaportrait.server.render.service import start_server

        self.server, _ = start_server(self.node, f"127.0.0.1:{self.port}", self.tls)

    def trust_site(self) -> None:
        trust_site(self)


def cli(*args: str, env: dict | None = None):
    """Run `megaportrait ARGS` in-process; asserts success and returns the result."""
    from megaportrait.shared.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def start_loopback_site(root: Path, *, workers: int = 1, render: dict | None = None) -> LoopbackSite:
    """PKI, node keys, policies and site.yaml under `root`; the node serving on 127.0.0.1 (a free port). The site's
    own signing key is not made here (the doc's first step makes it); call `trust_site` after it exists."""
    from megaportrait.server.render.backends import default_registry
    from megaportrait.server.render.node import RenderNode
    from megaportrait.server.render.service import TLSFiles, start_server
    from megaportrait.shared.config import RenderSettings

    etc, var, node_state = root / "etc", root / "var", root / "render-node"
    cli("pki", "init", "--out", str(root / "pki"), "--sites", SITE_ID, "--render-node-names", "localhost")
    (etc / "pki").mkdir(parents=True)
    shutil.copytree(root / "pki" / "sites" / SITE_ID, etc / "pki" / "site")
    cli("render-node", "keygen", "--state-dir", str(node_state), "--node-id", "render-node-1")
    shutil.copy(node_state / "node_public.json", etc / "node_public.json")
    shutil.copytree(REPO / "policies", etc / "policies")
    settings = RenderSettings(state_dir=node_state, **(render or {}))
    node = RenderNode.from_state_dir(node_state, registry=default_registry(settings),
                                     default_backend="classic", workers=workers)
    node.start()
    server, port = start_server(node, "127.0.0.1:0", TLSFiles.from_dir(root / "pki" / "render-node", "render-node"))
    site = LoopbackSite(root=root, etc=etc, var=var, config=etc / "site.yaml", node_state=node_state, node=node,
                        server=server, port=port, tls=TLSFiles.from_dir(root / "pki" / "render-node", "render-node"))
    text = site.substitute((REPO / "deploy" / "site-client" / "site.yaml").read_text())
    text = text.replace("render-node.example.org:50051", f"localhost:{port}")
    site.config.write_text(text)
    return site


def trust_site(site: LoopbackSite) -> None:
    """The node operator trusts the site's key file as `audit keygen` wrote it (`<policy.audit_key>.pub`)."""
    from megaportrait.shared.config import load_settings

    pub = Path(f"{load_settings(site.config).policy.audit_key}.pub")
    cli("render-node", "trust-site", "--site-id", SITE_ID, "--key", str(pub), "--state-dir", str(site.node_state))


@pytest.fixture
def loopback_site(tmp_path, shared_data, request):
    """The site of `start_loopback_site`; `@pytest.mark.parametrize("loopback_site", [{...}], indirect=True)` passes
    render-node settings."""
    site = start_loopback_site(tmp_path, render=getattr(request, "param", None))
    try:
        yield site
    finally:
        site.stop()
