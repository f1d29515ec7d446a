"""`megaportrait coordinator ...`: certificates, the SuperLink, site registration, runs, simulation and status.

A deployment, step by step (each step prints what the next needs); register, run, status, stop and sites take the
run's state folder from `coordinator.state_dir` of the settings file (--config or $MEGAPORTRAIT_CONFIG) or from
--state-dir, and keep the Flower CLI's connection in <state-dir>/flwr-cli:

    megaportrait coordinator certs --out fed/credentials --site clinic-a --site clinic-b --host coordinator.lan
    megaportrait coordinator superlink --credentials fed/credentials --port 9093 --state-dir fed/superlink
    megaportrait coordinator register --credentials fed/credentials --address coordinator.lan:9093 --state-dir fed/run
    # at each site: megaportrait client supernode --site-id clinic-a --data-dir photos/ --state-dir state/ ...
    megaportrait coordinator run --address coordinator.lan:9093 --credentials fed/credentials --rounds 3 \
        --state-dir fed/run
    megaportrait coordinator status --state-dir fed/run

The operator's guide is deploy/docs/coordinator.md; deploy/docs/one-machine.md runs these commands (doc-tested).
Heavy imports (Flower, torch) happen inside the commands, so `megaportrait --help` stays fast.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

coordinator = typer.Typer(help="Flower coordinator of the global Identity Net adapter (SuperLink, runs, budgets).",
                          no_args_is_help=True)

CONFIG_HELP = "Coordinator settings (coordinator.yaml); default $MEGAPORTRAIT_CONFIG."
FLWR_HOME_HELP = "Where the Flower CLI keeps its connection; default <state-dir>/flwr-cli."


def _settings(config: Optional[Path]):
    """The `coordinator` section of the settings file (`--config`, else $MEGAPORTRAIT_CONFIG, else defaults)."""
    from megaportrait.shared.config import load_settings

    return load_settings(config).coordinator


def _state_dir(state_dir: Optional[Path], config: Optional[Path]) -> Path:
    """The run's state folder, absolute: `--state-dir`, else the settings file's `coordinator.state_dir`. With
    neither there is no run to address, and guessing a folder under the working directory is how runs got lost."""
    if state_dir is None and config is None and not os.environ.get("MEGAPORTRAIT_CONFIG"):
        raise typer.BadParameter("no state dir: pass --state-dir, or --config (or $MEGAPORTRAIT_CONFIG) naming a "
                                 "settings file with coordinator.state_dir", param_hint="--state-dir")
    return (state_dir or _settings(config).state_dir).expanduser().resolve()


def _flwr_home(flwr_home: Optional[Path], state_dir: Path) -> Path:
    """Absolute, so that Flower's working folder and the paths inside it agree."""
    return (flwr_home or state_dir / "flwr-cli").expanduser().resolve()


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
             site: list[str] = typer.Option([], help="Sites to register (default: every key in credentials)."),
             state_dir: Optional[Path] = typer.Option(None, help="Default: coordinator.state_dir."),
             flwr_home: Optional[Path] = typer.Option(None, help=FLWR_HOME_HELP),
             config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)) -> None:
    """Register sites' public keys with the SuperLink so their SuperNodes may connect; the node id of each site
    is kept in <state-dir>/sites.json for `coordinator sites`."""
    from rich.progress import track

    from .deployment import FederationCredentials, record_site_node, register_site, write_connection

    creds = FederationCredentials.load(credentials)
    state = _state_dir(state_dir, config)
    home = _flwr_home(flwr_home, state)
    write_connection(home, address, creds.ca_cert)
    for s in track(site or list(creds.sites), description="registering sites"):
        node_id = register_site(s, creds, home)
        record_site_node(state, s, node_id, creds.site_public_key(s))
        typer.echo(f"{s}: node {node_id}")


@coordinator.command()
def run(credentials: Path = typer.Option(...), address: str = typer.Option("127.0.0.1:9093"),
        rounds: Optional[int] = typer.Option(None, help="Default: coordinator.rounds."),
        secure_aggregation: Optional[bool] = typer.Option(None, "--secure-aggregation/--no-secure-aggregation"),
        state_dir: Optional[Path] = typer.Option(None, help="Default: coordinator.state_dir."),
        flwr_home: Optional[Path] = typer.Option(None, help=FLWR_HOME_HELP),
        config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
        run_config: list[str] = typer.Option([], "--run-config", "-c",
                                             help="Other run-config overrides, key=value ([tool.flwr.app.config]).")
        ) -> None:
    """Submit a federated run to the SuperLink (`flwr run`); it resumes from state-dir's latest checkpoint.

    The run config is pyproject's [tool.flwr.app.config], then the settings' `coordinator` section (rounds,
    min_sites, state_dir, run_config), then these options. An unknown key is refused by name."""
    from .deployment import FederationCredentials, run_config_from_settings, submit_run, write_connection

    overrides = _parse_config(run_config)
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    if secure_aggregation is not None:
        overrides["secure-aggregation"] = secure_aggregation
    overrides["state-dir"] = str(_state_dir(state_dir, config))
    fused = run_config_from_settings(_settings(config), overrides)
    home = _flwr_home(flwr_home, Path(fused["state-dir"]))
    write_connection(home, address, FederationCredentials.load(credentials).ca_cert)
    run_id = submit_run(home, fused)
    typer.echo(f"run {run_id} started ({fused['num-server-rounds']} rounds, state in {fused['state-dir']}); "
               "follow it with `megaportrait coordinator status`")


@coordinator.command()
def stop(run_id: Optional[int] = typer.Argument(None, help="The run to stop; default: the run in the state dir."),
         credentials: Path = typer.Option(...), address: str = typer.Option("127.0.0.1:9093"),
         state_dir: Optional[Path] = typer.Option(None, help="Default: coordinator.state_dir."),
         flwr_home: Optional[Path] = typer.Option(None, help=FLWR_HOME_HELP),
         config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)) -> None:
    """Stop a run deliberately (`flwr stop`): the coordinator audits `run.stop` and status says `stopped`; a later
    `coordinator run` resumes from the latest checkpoint."""
    from .deployment import FederationCredentials, request_stop, write_connection

    state = _state_dir(state_dir, config)
    home = _flwr_home(flwr_home, state)
    write_connection(home, address, FederationCredentials.load(credentials).ca_cert)
    status_ = request_stop(home, state, run_id)
    typer.echo(f"run {status_['run_id']} stopped at round {status_.get('round')}; "
               "`megaportrait coordinator run` resumes it from the latest checkpoint")


@coordinator.command()
def sites(credentials: Path = typer.Option(...), address: str = typer.Option("127.0.0.1:9093"),
          state_dir: Optional[Path] = typer.Option(None, help="Default: coordinator.state_dir."),
          flwr_home: Optional[Path] = typer.Option(None, help=FLWR_HOME_HELP),
          config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)) -> None:
    """Each registered SuperNode with its site id and status (`flwr supernode ls`, joined with sites.json)."""
    from .deployment import FederationCredentials, list_sites, write_connection

    state = _state_dir(state_dir, config)
    home = _flwr_home(flwr_home, state)
    write_connection(home, address, FederationCredentials.load(credentials).ca_cert)
    typer.echo(json.dumps(list_sites(home, state), indent=1))


@coordinator.command()
def simulate(sites_dir: Path = typer.Argument(..., help="One sub-folder per site, in it one folder of photos per "
                                                         "person (named by person_ref)."),
             consent_dir: Path = typer.Option(..., help="One sub-folder per site with its consent.sqlite, site.key "
                                                        "and audit.jsonl; checked by every site each round."),
             state_dir: Path = typer.Option(Path("runs/coordinator-sim")), rounds: int = typer.Option(2),
             secure_aggregation: bool = typer.Option(True, "--secure-aggregation/--no-secure-aggregation"),
             run_config: list[str] = typer.Option([], "--run-config", "-c", help="Run-config overrides, key=value.")
             ) -> None:
    """Run the federation on Flower's simulation engine (one virtual SuperNode per site folder)."""
    from .deployment import simulate as _simulate

    overrides = {"num-server-rounds": rounds, "secure-aggregation": secure_aggregation, **_parse_config(run_config)}
    result = _simulate(sites_dir, state_dir.resolve() / "coordinator", site_state_dir=state_dir.resolve() / "sites",
                       run_config=overrides, consent=consent_dir)
    typer.echo(json.dumps({"seconds": round(result.seconds, 1), "status": result.status,
                           "budget": result.budget}, indent=1, default=str))


@coordinator.command()
def status(state_dir: Optional[Path] = typer.Option(None, help="Default: coordinator.state_dir."),
           config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)) -> None:
    """Latest checkpoint, run state (running, finished, stopped or failed) and each site's epsilon and refusals."""
    from .checkpoint import load_checkpoint
    from .deployment import read_site_nodes

    state = _state_dir(state_dir, config)
    if not state.is_dir():
        raise typer.BadParameter(f"{state} does not exist: no run has used this state dir (set --state-dir or "
                                 "coordinator.state_dir)", param_hint="--state-dir")
    status_file, budget_file = state / "status.json", state / "budget.json"
    latest = load_checkpoint(state)
    budget = json.loads(budget_file.read_text()) if budget_file.is_file() else None
    typer.echo(json.dumps({
        "state_dir": str(state),
        "status": json.loads(status_file.read_text()) if status_file.is_file() else None,
        "checkpoint": None if latest is None else {"round": latest.round, "sites": latest.sites, **latest.meta},
        "budget": budget, "privacy": privacy_by_site(budget),
        "sites": read_site_nodes(state)}, indent=1, default=str))


def privacy_by_site(budget: dict | None) -> dict | None:
    """Each site's epsilon in the three units as the coordinator knows them: per photo as the site reported it
    (its Opacus accountant), per site from the coordinator's own accountant, per person bounded by per site (a
    person's photos are part of one site's update; the site's own `client privacy` has the tighter figure)."""
    if budget is None:
        return None
    return {site: {"per_photo": a.get("epsilon"), "per_site": a.get("site_epsilon"),
                   "per_person_at_most": a.get("site_epsilon"), "delta": budget.get("delta"),
                   "accountant": budget.get("accountant")} for site, a in budget.get("sites", {}).items()}
