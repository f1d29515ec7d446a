"""`megaportrait client ...`: a customer site's commands (its SuperNode, local personalisation, its privacy ledger,
its retention sweep).

Heavy imports happen inside the commands, so `megaportrait --help` stays fast. `supernode` and `personalise` first
sweep the site's expired data (client/retention.py; refused to start if a deletion cannot be verified), and
`supernode` sweeps again every `sweep.interval` of the retention policy while it runs.
"""
from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer

client = typer.Typer(help="Customer site: federated rounds of the global adapter; per-person adapters stay here.",
                     no_args_is_help=True)

SITE_ID_HELP = "This site's id (names its sweeper in the audit log)."
CONFIG_HELP = ("Site settings (policy: consent_file, retention_file, consent_ledger, audit_key, audit_log); "
               "default $MEGAPORTRAIT_CONFIG.")


def _sweep_lines(sweeper: Any, report: Any) -> list[str]:
    """What a sweep did, from the audit entries it read back: kind, person and digest per item."""
    from megaportrait.client.retention import RECEIPTS_KIND

    lines = [f"retention sweep at {report.at.isoformat(timespec='seconds')}: {report.deleted_count} deleted, "
             f"{len(report.failed)} failed, {report.kept} kept"]
    for e in sweeper.last_audited:
        if e.action != "retention.delete":
            continue
        kind = e.detail.get("kind", "?")
        label = "receipt" if kind == RECEIPTS_KIND else "sha256"
        status = "deleted" if e.outcome == "ok" else "FAILED "
        line = f"  {status} {kind:<17} person {e.person or '-':<20} {label} {e.data[0][:16]}"
        if e.outcome != "ok":
            line += f": {e.detail.get('reason', '')}"
        lines.append(line)
    lines.append(f"audit: {len(sweeper.last_audited)} entries read back from {sweeper.audit.path} "
                 "(hash and signature checked)")
    return lines


def _open_sweeper(stack: ExitStack, config: Optional[Path], *, site_id: str, data_dir: Path, state_dir: Path,
                  component: str) -> tuple[Any, Any]:
    """(settings, the site's sweeper) opened on `stack`; a bad settings or policy file, or a missing key, ledger or
    folder, exits 2 with the file (and line) at fault."""
    from megaportrait.client.retention import open_site_retention
    from megaportrait.shared.config import load_settings
    from megaportrait.shared.errors import MegaPortraitError

    try:
        settings = load_settings(config)
        sweeper = stack.enter_context(open_site_retention(settings.policy, site_id=site_id, data_dir=data_dir,
                                                          state_dir=state_dir, component=component))
    except (MegaPortraitError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings, sweeper


def _run_sweep(sweeper: Any, *, what: str) -> Any:
    """One sweep with a progress bar; prints what it deleted. Exits 1 if a deletion could not be verified, or the
    sweep (or reading its audit entries back) failed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from megaportrait.client.retention import describe_failures
    from megaportrait.shared.errors import MegaPortraitError

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(what, total=None)
            report = sweeper.sweep(progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (MegaPortraitError, OSError, ValueError) as exc:
        typer.echo(f"error: {what} failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in _sweep_lines(sweeper, report):
        typer.echo(line)
    if report.failed:
        typer.echo(f"error: {what}: {len(report.failed)} deletion(s) could not be verified (the data can still be "
                   "read); fix them and sweep again:", err=True)
        for line in describe_failures(report):
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1)
    return report


def _startup_sweep(sweeper: Any) -> None:
    """The start-up sweep, unless the retention policy says `sweep.on_startup: false`."""
    if not sweeper.policy.rules.sweep.on_startup:
        typer.echo(f"start-up retention sweep off (sweep.on_startup in {sweeper.policy.path})")
        return
    _run_sweep(sweeper, what="start-up retention sweep")


@client.command()
def supernode(site_id: str = typer.Option(..., help="This site's id (its key is sites/<id> in the credentials)."),
              data_dir: Path = typer.Option(..., help="Photos: one sub-folder per person. They never leave."),
              state_dir: Path = typer.Option(..., help="Crop cache, privacy ledger, global adapter, outbox audit."),
              credentials: Path = typer.Option(..., help="Folder with ca.pem and sites/<site-id> (private key)."),
              superlink: str = typer.Option("127.0.0.1:9093", help="The coordinator's SuperLink host:port."),
              runtime_port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API."),
              config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
              ) -> None:
    """Run this site's `flower-supernode` (TLS to the SuperLink, authenticated with the site key) until stopped.
    Each round the site trains only on the people whose federated-training consent holds in its consent ledger.
    Expired site data is swept before it starts and every `sweep.interval` while it runs."""
    from megaportrait.client.federation import SiteConsent
    from megaportrait.server.coordinator.deployment import FederationCredentials, start_supernode

    creds = FederationCredentials(credentials, (site_id,))
    if not creds.site_private_key(site_id).is_file():
        raise typer.BadParameter(f"no key {creds.site_private_key(site_id)}; ask the coordinator for it")
    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        settings, sweeper = _open_sweeper(stack, config, site_id=site_id, data_dir=data_dir, state_dir=state_dir,
                                          component=f"supernode:{site_id}")
        policy = settings.policy
        consent = SiteConsent(policy.consent_ledger, policy.audit_key, policy.audit_log, policy.consent_file)
        _startup_sweep(sweeper)
        stop = threading.Event()
        thread = sweeper.run_every(stop, on_startup=False)
        stack.callback(_stop_sweeper, stop, thread)
        process = start_supernode(site_id, creds, superlink=superlink, data_dir=data_dir, state_dir=state_dir,
                                  runtime_port=runtime_port, consent=consent)
        typer.echo(f"site {site_id} connected to {superlink}; log {process.log_path}; every message this site sends "
                   f"is recorded in {state_dir / 'outbox'}; retention sweep every "
                   f"{sweeper.policy.rules.sweep.interval}. Ctrl-C stops.")
        process.run_until_interrupted()


def _stop_sweeper(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(timeout=120)
    if thread.is_alive():
        typer.echo("warning: the retention sweeper did not finish within 120 s", err=True)


@client.command()
def personalise(person_dir: Path = typer.Argument(..., help="Photos of one consenting person: their folder inside "
                                                             "--data-dir."),
                state_dir: Path = typer.Option(..., help="The site's state folder (holds the global adapter; the "
                                                          "adapter is written to its adapters/<person-ref>/)."),
                data_dir: Path = typer.Option(..., help="The site's photo folder (one sub-folder per person)."),
                person_ref: str = typer.Option(..., help="Pseudonymous reference (a hash), never a name."),
                site_id: str = typer.Option(..., envvar="MEGAPORTRAIT_SITE_ID", help=SITE_ID_HELP),
                steps: Optional[int] = typer.Option(None),
                config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
                privacy_policy: Optional[Path] = typer.Option(None, help="The site's privacy policy (epsilon "
                                                              "budgets); default policies/privacy.yaml.")) -> None:
    """Fine-tune a per-person adapter from the latest global adapter, locally, with the person's personal_adapter
    consent (checked in the site's consent ledger before and after training). Expired site data is swept first. The
    adapter goes to <state-dir>/adapters/<person-ref>/, where the retention sweeper deletes it once
    `personal_adapters.keep` has passed. Nothing is sent anywhere."""
    from megaportrait.client.faces import intake_photos
    from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger, load_global_adapter, \
        personalise_adapter
    from megaportrait.client.retention import adapter_store
    from megaportrait.shared.adapters import adapter_to_bytes
    from megaportrait.shared.policy import DEFAULT_PRIVACY_POLICY, load_privacy_policy
    from megaportrait.shared.config import FaceSettings
    from megaportrait.shared.errors import MegaPortraitError

    if not state_dir.is_dir():
        raise typer.BadParameter(f"{state_dir} is not a folder", param_hint="--state-dir")
    inside = person_dir.resolve().is_relative_to(data_dir.resolve()) and person_dir.resolve() != data_dir.resolve()
    if not person_dir.is_dir() or not inside:
        raise typer.BadParameter(f"{person_dir} is not a person folder inside {data_dir}: photos outside the site's "
                                 "data folder are not covered by its retention sweeper", param_hint="PERSON_DIR")
    store = adapter_store(state_dir)
    try:
        store._path(person_ref, "adapter.safetensors")  # refuses a ref that is not a plain file name
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--person-ref") from None
    with ExitStack() as stack:
        loaded, sweeper = _open_sweeper(stack, config, site_id=site_id, data_dir=data_dir, state_dir=state_dir,
                                        component=f"client-cli:{site_id}")
        _startup_sweep(sweeper)
        settings = loaded.identity
        try:
            arrays, round_ = load_global_adapter(state_dir)
        except MegaPortraitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        photos = sorted(p for p in person_dir.iterdir() if p.is_file()) if person_dir.is_dir() else []
        if not photos:
            typer.echo(f"error: no photos left in {person_dir} (the start-up sweep deletes expired ones)", err=True)
            raise typer.Exit(2)
        report = intake_photos(photos, FaceSettings(crop_size=settings.resolution))
        for origin, reason in report.reasons().items():
            typer.echo(f"rejected {Path(origin).name}: {reason}")
        try:
            policy = load_privacy_policy(DEFAULT_PRIVACY_POLICY if privacy_policy is None else privacy_policy)
            privacy_ledger = SitePrivacyLedger(state_dir / LEDGER_FILE, policy.rules.accountant, policy.rules.delta)
            adapter = personalise_adapter(report.crops, settings, person_ref=person_ref, global_arrays=arrays,
                                          steps=steps, progress=True, ledger=sweeper.ledger, actor="operator:cli",
                                          privacy_ledger=privacy_ledger,
                                          per_photo_budget=policy.budgets.per_photo)
        except MegaPortraitError as exc:  # too few usable photos, consent missing or ended: nothing is written
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    data = adapter_to_bytes(adapter)  # the one adapter format, with its privacy report: what sealing reads
    now = datetime.now(timezone.utc)
    item = store.put(person_ref, f"adapter-r{round_}-{now:%Y%m%dT%H%M%SZ}.safetensors", data, created_at=now)
    typer.echo(f"adapter for {person_ref[:12]} from global round {round_}: {store.root / item.item_id} (epsilon "
               f"{adapter.privacy.epsilon:.3g} for this personalisation)")


@client.command()
def sweep(site_id: str = typer.Option(..., envvar="MEGAPORTRAIT_SITE_ID", help=SITE_ID_HELP),
          data_dir: Path = typer.Option(..., help="The site's photos: one sub-folder per person (the SuperNode's "
                                                  "data-dir)."),
          state_dir: Path = typer.Option(..., help="The site's state folder: crop cache and adapters/ (the "
                                                   "SuperNode's state-dir)."),
          config: Optional[Path] = typer.Option(None, help=CONFIG_HELP)) -> None:
    """Delete the site's data that the retention policy says is too old (source photos, face crops and the crop
    cache, personal adapters, ended consent receipts), read each deletion back and audit it. Exit 1 if a deletion
    could not be verified, 2 if the settings, a policy file, the key or the ledger is at fault."""
    with ExitStack() as stack:
        _, sweeper = _open_sweeper(stack, config, site_id=site_id, data_dir=data_dir, state_dir=state_dir,
                                   component=f"client-cli:{site_id}")
        _run_sweep(sweeper, what="retention sweep")


@client.command()
def privacy(state_dir: Path = typer.Option(..., help="The site's state folder."),
            privacy_policy: Optional[Path] = typer.Option(None, help="The site's privacy policy (budgets); default "
                                                                       "policies/privacy.yaml."),
            as_json: bool = typer.Option(False, "--json", help="JSON instead of lines.")) -> None:
    """This site's epsilon in the three units (per photo, per person, per site), from its Opacus accountant
    histories (global rounds, personal adapters, federation noise), beside its budgets."""
    from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger
    from megaportrait.shared.policy import DEFAULT_PRIVACY_POLICY, load_privacy_policy

    policy = load_privacy_policy(DEFAULT_PRIVACY_POLICY if privacy_policy is None else privacy_policy)
    ledger = SitePrivacyLedger(state_dir / LEDGER_FILE, policy.rules.accountant, policy.rules.delta)
    figures = ledger.figures()
    if as_json:
        typer.echo(json.dumps({**figures.to_json(), "budgets": policy.budgets.model_dump(),
                               "global_rounds": len(ledger.history), "personal_adapters": len(ledger.personal),
                               "rounds": ledger.rounds}, indent=1))
        return
    budgets = policy.budgets
    for line, unit in zip(figures.lines(), ("per_photo", "per_person", "per_site", None)):
        typer.echo(line + (f" / budget {getattr(budgets, unit):g}" if unit else ""))
    typer.echo(f"{len(ledger.history)} global round(s), {len(ledger.personal)} personal adapter(s) on this site's "
               "photos")


from .site_cli import register as _register_site_commands  # noqa: E402 - typer-level only

_register_site_commands(client)
