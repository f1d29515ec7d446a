"""`megaportrait pki`: create the deployment's CA, server and site certificates and Flower node-auth keys.

`init` lays the files out as one folder per machine, so each folder is copied (or mounted as a Kubernetes
Secret) as a whole and nothing else:

    OUT/ca/                 ca.pem ca.key             the CA key: keep it offline; only `add-site` needs it
    OUT/coordinator/        ca.pem superlink.pem/.key the Flower SuperLink's TLS identity, and
                            sites/<id>.pub            each site's node-auth public key, to register
    OUT/render-node/        ca.pem render-node.pem/.key
    OUT/sites/<id>/         ca.pem <id>.pem/.key      client certificate (CN = site id) for the render node
                            node-auth.key/.pub        the site SuperNode's Flower authentication key (OpenSSH EC)
    OUT/inventory.json      what was issued: subjects, names, expiry, fingerprints (no secrets)

Each folder is a valid `--tls-dir` for `megaportrait render-node serve` (cert name `render-node`) and for a site's
client (cert name = site id); OUT/coordinator is a valid `--credentials` for `megaportrait coordinator register`
and `run`. Only typer-level code runs at import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Private PKI: CA, server and site certificates, Flower node-auth keys.", no_args_is_help=True)

DEFAULT_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", help="Folder to create the PKI in (must not hold a CA yet).")],
    sites: Annotated[str, typer.Option(help="Comma-separated site ids, e.g. alpha,beta,gamma.")] = "",
    coordinator_names: Annotated[
        str, typer.Option(help="Comma-separated DNS names / IPs the sites use to reach the SuperLink.")
    ] = "coordinator",
    render_node_names: Annotated[
        str, typer.Option(help="Comma-separated DNS names / IPs the sites use to reach the render node.")
    ] = "render-node",
    local: Annotated[bool, typer.Option(help="Also name localhost, 127.0.0.1 and ::1 in server certificates.")] = True,
    days: Annotated[int, typer.Option(min=1, help="Validity of server and site certificates, in days.")] = 365,
) -> None:
    """Create the CA, the coordinator and render-node server certificates and one client identity per site."""
    from rich.console import Console

    from . import pki_layout

    site_ids = _split(sites)
    extra = DEFAULT_LOCAL_NAMES if local else ()
    console = Console(stderr=True)
    try:
        with console.status(f"creating the PKI in {out}"):
            inventory = pki_layout.create(
                out,
                sites=site_ids,
                coordinator_names=tuple(_split(coordinator_names)) + extra,
                render_node_names=tuple(_split(render_node_names)) + extra,
                days=days,
            )
    except pki_layout.PKILayoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for item in inventory["issued"]:
        typer.echo(f"{item['role']:<12} {item['subject']:<24} {item['files']}")
    typer.echo(f"CA key: {out / 'ca' / 'ca.key'} (keep it offline; `megaportrait pki add-site` needs it)")
    typer.echo(f"register the sites' node-auth keys: megaportrait coordinator register --credentials {out / 'coordinator'}")


@app.command("add-site")
def add_site(
    out: Annotated[Path, typer.Option("--out", help="The folder `pki init` created.")],
    site: Annotated[str, typer.Option(help="The new site's id.")],
    days: Annotated[int, typer.Option(min=1)] = 365,
) -> None:
    """Issue a client certificate and node-auth key for one more site from the existing CA."""
    from . import pki_layout

    try:
        item = pki_layout.add_site(out, site, days=days)
    except pki_layout.PKILayoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{item['role']:<12} {item['subject']:<24} {item['files']}")


@app.command()
def show(out: Annotated[Path, typer.Argument(help="The folder `pki init` created.")]) -> None:
    """List every certificate under the folder with its expiry; exit 1 if any is expired or not signed by the CA."""
    from . import pki_layout

    try:
        rows = pki_layout.check(out)
    except pki_layout.PKILayoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    bad = 0
    for row in rows:
        typer.echo(f"{row['status']:<8} {row['subject']:<24} expires {row['not_after']}  {row['path']}")
        bad += row["status"] != "ok"
    raise typer.Exit(1 if bad else 0)
