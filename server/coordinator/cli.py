"""`megaportrait coordinator ...`: certificates, the SuperLink, site registration, runs, simulation and status.

A deployment, step by step (each step prints what the next needs):

    megaportrait coordinator certs --out fed/credentials --site clinic-a --site clinic-b --host coordinator.lan
    megaportrait coordinator superlink --credentials fed/credentials --port 9093 --state-dir fed/superlink
    megaportrait coordinator register --credentials fed/credentials --address coordinator.lan:9093
    # at each site: megaportrait client supernode --site-id clinic-a --data-dir photos/ --state-dir state/ ...
    megaportrait coordinator run --address coordinator.lan:9093 --credentials fed/credentials --rounds 3

Heavy imports (Flower, torch) happen inside the commands, so `megaportrait --help` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

coordinator = typer.Typer(help="Flower coordinator of the global Identity Net adapter (SuperLink, runs, budgets).",
                          no_args_is_help=True)

DEFAULT_HOME = Path("runs/coordinator/flwr-cli")


def _parse_config(pairs: list[str]) -> dict:
    """`key=value` pairs (values as TOML scalars: numbers, true/false, "strings")."""
    import tomllib

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"{pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


@coordinator.command()
def certs(out: Path = typer.Option(..., help="Folder for the CA, SuperLink certificate and site keys."),
          site: list[str] = typer.Option([], help="Site id to create a node-authentication key for (repeat)."),
          host: list[str] = typer.Option(["127.0.0.1", "localhost"], help="Names/IPs the SuperLink is reached at.")
          ) -> None:
    """Create (or extend) the federation's CA, SuperLink TLS certificate and per-site SuperNode keys."""
    from .deployment import issue_credentials

    creds = issue_credentials(out, site, hosts=tuple(host))
    typer.echo(f"CA: {creds.ca_cert}\nSuperLink certificate: {creds.superlink_cert}")
    for s in creds.sites:
        typer.echo(f"site {s}: private key {creds.site_private_key(s)} (give to the site), public key "
                   f"{creds.site_public_key(s)} (register it)")


@coordinator.command()
def superlink(credentials: Path = typer.Option(..., help="Folder from `coordinator certs`."),
              port: int = typer.Option(9093), host: str = typer.Option("0.0.0.0"),
              state_dir: Path = typer.Option(Path("runs/coordinator/superlink"))) -> None:
    """Run `flower-superlink` with TLS and SuperNode authentication until interrupted."""
    from .deployment import FederationCredentials, start_superlink

    process = start_superlink(FederationCredentials.load(credentials), port=port, state_dir=state_dir, host=host)
    typer.echo(f"SuperLink listening on {host}:{port} (TLS, SuperNode auth); log {process.log_path}. Ctrl-C stops.")
    process.run_until_interrupted()


@coordinator.command()
def register(credentials: Path = typer.Option(...), address: str = typer.Option("127.0.0.1:9093"),
             flwr_home: Path = typer.Option(DEFAULT_HOME, help="Where the Flower CLI keeps its connection."),
             site: list[str] = typer.Option([], help="Sites to register (default: every key in credentials)."),
             ) -> None:
    """Register sites' public keys with the SuperLink so their SuperNodes may connect."""
    from rich.progress import track

    from .deployment import FederationCredentials, register_site, write_connection

    creds = FederationCredentials.load(credentials)
    write_connection(flwr_home, address, creds.ca_cert)
    for s in track(site or list(creds.sites), description="registering sites"):
        typer.echo(f"{s}: node {register_site(s, creds, flwr_home)}")


@coordinator.command()
def run(credentials: Path = typer.Option(...), address: str = typer.Option("127.0.0.1:9093"),
        flwr_home: Path = typer.Option(DEFAULT_HOME), rounds: Optional[int] = typer.Option(None),
        secure_aggregation: Optional[bool] = typer.Option(None, "--secure-aggregation/--no-secure-aggregation"),
        state_dir: Optional[Path] = typer.Option(None), config: list[str] = typer.Option(
            [], "--config", "-c", help="Other run-config overrides, key=value ([tool.flwr.app.config]).")) -> None:
    """Submit a federated run to the SuperLink (`flwr run`); it resumes from state-dir's latest checkpoint."""
    from .deployment import FederationCredentials, submit_run, write_connection

    write_connection(flwr_home, address, FederationCredentials.load(credentials).ca_cert)
    overrides = _parse_config(config)
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    if secure_aggregation is not None:
        overrides["secure-aggregation"] = secure_aggregation
    if state_dir is not None:
        overrides["state-dir"] = str(state_dir.resolve())
    typer.echo(f"run {submit_run(flwr_home, overrides)} started; follow it with `megaportrait coordinator status`")


@coordinator.command()
def stop(run_id: int = typer.Argument(..., help="The run to stop (e.g. one whose coordinator process died)."),
         credentials: Path = typer.Option(...), address: str = typer.Option("127.0.0.1:9093"),
         flwr_home: Path = typer.Option(DEFAULT_HOME)) -> None:
    """Mark a run stopped at the SuperLink (`flwr stop`); then `coordinator run` resumes from the checkpoint."""
    from .deployment import FederationCredentials, stop_run, write_connection

    write_connection(flwr_home, address, FederationCredentials.load(credentials).ca_cert)
    stop_run(flwr_home, run_id)
    typer.echo(f"run {run_id} stopped")


@coordinator.command()
def simulate(sites_dir: Path = typer.Argument(..., help="One sub-folder per site, in it one folder of photos per "
                                                         "person (named by person_ref)."),
             consent_dir: Path = typer.Option(..., help="One sub-folder per site with its consent.sqlite, site.key "
                                                        "and audit.jsonl; checked by every site each round."),
             state_dir: Path = typer.Option(Path("runs/coordinator-sim")), rounds: int = typer.Option(2),
             secure_aggregation: bool = typer.Option(True, "--secure-aggregation/--no-secure-aggregation"),
             config: list[str] = typer.Option([], "--config", "-c")) -> None:
    """Run the federation on Flower's simulation engine (one virtual SuperNode per site folder)."""
    from .deployment import simulate as _simulate

    overrides = {"num-server-rounds": rounds, "secure-aggregation": secure_aggregation, **_parse_config(config)}
    result = _simulate(sites_dir, state_dir.resolve() / "coordinator", site_state_dir=state_dir.resolve() / "sites",
                       run_config=overrides, consent=consent_dir)
    typer.echo(json.dumps({"seconds": round(result.seconds, 1), "status": result.status,
                           "budget": result.budget}, indent=1, default=str))


@coordinator.command()
def status(state_dir: Path = typer.Option(Path("runs/coordinator"))) -> None:
    """Latest checkpoint, run state and each site's epsilon and refusals."""
    from .checkpoint import load_checkpoint

    status_file, budget_file = state_dir / "status.json", state_dir / "budget.json"
    latest = load_checkpoint(state_dir)
    budget = json.loads(budget_file.read_text()) if budget_file.is_file() else None
    typer.echo(json.dumps({
        "status": json.loads(status_file.read_text()) if status_file.is_file() else None,
        "checkpoint": None if latest is None else {"round": latest.round, "sites": latest.sites, **latest.meta},
        "budget": budget, "privacy": privacy_by_site(budget)}, indent=1, default=str))


def privacy_by_site(budget: dict | None) -> dict | None:
    """Each site's epsilon in the three units as the coordinator knows them: per photo as the site reported it
    (its Opacus accountant), per site from the coordinator's own accountant, per person bounded by per site (a
    person's photos are part of one site's update; the site's own `client privacy` has the tighter figure)."""
    if budget is None:
        return None
    return {site: {"per_photo": a.get("epsilon"), "per_site": a.get("site_epsilon"),
                   "per_person_at_most": a.get("site_epsilon"), "delta": budget.get("delta"),
                   "accountant": budget.get("accountant")} for site, a in budget.get("sites", {}).items()}
