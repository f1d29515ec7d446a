"""`megaportrait render-node ...`: make the node's keys, trust a site, serve the gRPC API.

Heavy imports (grpc, backends) happen inside the commands, so `megaportrait --help` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="The on-prem render node: keys, trusted sites, gRPC service.", no_args_is_help=True)

STATE_DIR = typer.Option(Path("runs/render-node"), "--state-dir", help="Keys, trusted sites and the job store live here.")


@app.command()
def keygen(
    state_dir: Path = STATE_DIR,
    node_id: str = typer.Option("render-node", help="Name this node signs deletion confirmations with."),
) -> None:
    """Create the node's HPKE (ML-KEM-768+X25519) and Ed25519 keys; print node_public.json's path for the sites."""
    from megaportrait.server.render.node import NodeIdentity
    from megaportrait.shared.crypto import ed25519_fingerprint

    identity = NodeIdentity.generate(node_id)
    public = identity.save(state_dir)
    pub = identity.public()
    typer.echo(f"wrote node keys under {state_dir / 'keys'} (mode 0600)")
    typer.echo(f"give this file to the sites: {public}")
    typer.echo(f"HPKE key fingerprint:    {pub.hpke.fingerprint()}")
    typer.echo(f"signing key fingerprint: {ed25519_fingerprint(pub.signing)}")


@app.command("trust-site")
def trust_site(
    site_id: str = typer.Option(..., help="The site's id, as it appears in its payload headers."),
    key: Path = typer.Option(..., exists=True, dir_okay=False,
                             help="The site's Ed25519 public key: the `<key>.pub` file `megaportrait audit keygen` "
                                  "wrote beside the site's signing key (policy.audit_key; hex), or PEM."),
    state_dir: Path = STATE_DIR,
) -> None:
    """Accept payloads signed by this site key (the key that also signs the site's consent receipts and audit log);
    a running node picks it up at its next submission (no restart)."""
    from megaportrait.server.render.payloads import TrustedSites
    from megaportrait.shared.audit import AuditError, load_public_key

    try:
        public = load_public_key(key)
    except AuditError as exc:
        typer.echo(f"error: {key}: {exc}; give the site's `<policy.audit_key>.pub` file (64 hex characters, from "
                   "`megaportrait audit keygen`) or a PEM public key", err=True)
        raise typer.Exit(2) from None
    fp = TrustedSites().add(site_id, public, state_dir / "trusted_sites")
    typer.echo(f"trusted site {site_id} key {fp} (a running node uses it from its next submission)")


@app.command()
def serve(
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Keys, trusted sites and the job store [render.state_dir]."),
    listen: Optional[str] = typer.Option(None, help="host:port to listen on; port 0 picks a free one [render.listen]."),
    tls_dir: Optional[Path] = typer.Option(None, help="Holds ca.pem and <cert-name>.pem/.key from `megaportrait pki init` [render.tls_dir]."),
    cert_name: str = typer.Option("render-node", help="Certificate name inside --tls-dir."),
    backend: Optional[str] = typer.Option(None, help="Default backend for jobs that name none [render.backend]."),
    workers: Optional[int] = typer.Option(None, min=1, help="Jobs rendered at once [render.workers]."),
    config: Optional[Path] = typer.Option(None, help="MegaPortrait YAML config (else $MEGAPORTRAIT_CONFIG, else defaults)."),
) -> None:
    """Serve the render API over mutual TLS until interrupted (SIGINT/SIGTERM); unfinished jobs resume next start.

    At start the consent and retention policies are validated (policy.consent_file, policy.retention_file; a bad file
    is refused with its line), expired data is swept, and /healthz + /metrics are served on health.listen when set.
    The node's audit log is <state-dir>/audit/audit.jsonl unless policy.audit_log / policy.audit_key are configured.
    """

    from megaportrait.server.render.backends import default_registry
    from megaportrait.server.render.node import RenderNode
    from megaportrait.server.render.retention import load_node_policies
    from megaportrait.server.render.service import TLSFiles, start_health, start_server
    from megaportrait.shared import service_health
    from megaportrait.shared.config import load_settings
    from megaportrait.shared.errors import MegaPortraitError
    from megaportrait.shared.logs import configure_logging

    configure_logging()
    try:
        settings = load_settings(config)
        rs, ps = settings.render, settings.policy
        state_dir = state_dir or rs.state_dir
        policies = load_node_policies(ps.consent_file, ps.retention_file)
        # policy.audit_log/audit_key when configured explicitly; else the node's own log in its state dir
        audit_files = (ps.audit_log, ps.audit_key) if {"audit_log", "audit_key"} & ps.model_fields_set else None
        node = RenderNode.from_state_dir(
            state_dir, registry=default_registry(rs), default_backend=backend or rs.backend, workers=workers or rs.workers,
            max_attempts=rs.max_job_attempts, policies=policies, audit_files=audit_files,
            metrics_registry=service_health.new_registry("render-node"),
        )
    except MegaPortraitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"policies: consent {policies.consent.version_hash[:12]}, retention {policies.retention.version_hash[:12]}; "
               f"audit log {node.audit.path}")
    if rs.diffusion_base_model is None:
        import logging

        from megaportrait.shared.base_models import TINY_MODEL_NOTE

        logging.getLogger("megaportrait.render").warning("diffusion backend: %s", TINY_MODEL_NOTE)
        typer.echo(f"WARNING diffusion backend: {TINY_MODEL_NOTE}", err=True)
    server = health = None
    try:
        resumed, ended = node.start()
        typer.echo(f"recovered jobs: {len(resumed)} resumed, {len(ended)} ended")
        report = node.retention.last_report
        if node.retention.last_error:
            typer.echo(f"start-up retention sweep failed: {node.retention.last_error} (see /healthz; it is retried every interval)", err=True)
        elif report is not None:
            typer.echo(f"start-up retention sweep: {report.deleted_count} deleted, {len(report.failed)} failed, {report.kept} kept")
        server, port = start_server(node, listen or rs.listen, TLSFiles.from_dir(tls_dir or rs.tls_dir, cert_name))
        if settings.health.listen:
            health = start_health(node, settings.health.listen)
            typer.echo(f"/healthz and /metrics on {health.url}")
    except (MegaPortraitError, OSError) as exc:
        if server is not None:
            server.stop(grace=None)
        node.stop()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"render node {node.identity.node_id} serving on port {port} (mutual TLS); Ctrl-C stops it")
    service_health.wait_until_terminated()
    server.stop(grace=5).wait()
    if health is not None:
        health.stop()
    node.stop()
    typer.echo("stopped; unfinished jobs resume on the next start")
