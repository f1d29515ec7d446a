"""`megaportrait client ...`: a customer site's commands (its SuperNode, local personalisation, its privacy ledger).

Heavy imports happen inside the commands, so `megaportrait --help` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

client = typer.Typer(help="Customer site: federated rounds of the global adapter; per-person adapters stay here.",
                     no_args_is_help=True)


@client.command()
def supernode(site_id: str = typer.Option(..., help="This site's id (its key is sites/<id> in the credentials)."),
              data_dir: Path = typer.Option(..., help="Photos: one sub-folder per person. They never leave."),
              state_dir: Path = typer.Option(..., help="Crop cache, privacy ledger, global adapter, outbox audit."),
              credentials: Path = typer.Option(..., help="Folder with ca.pem and sites/<site-id> (private key)."),
              superlink: str = typer.Option("127.0.0.1:9093", help="The coordinator's SuperLink host:port."),
              runtime_port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API."),
              config: Optional[Path] = typer.Option(None, help="Site settings (policy: consent_ledger, audit_key, "
                                                               "audit_log, consent_file); default $MEGAPORTRAIT_CONFIG."),
              ) -> None:
    """Run this site's `flower-supernode` (TLS to the SuperLink, authenticated with the site key) until stopped.
    Each round the site trains only on the people whose federated-training consent holds in its consent ledger."""
    from megaportrait.client.federation import SiteConsent
    from megaportrait.server.coordinator.deployment import FederationCredentials, start_supernode
    from megaportrait.shared.config import load_settings

    creds = FederationCredentials(credentials, (site_id,))
    if not creds.site_private_key(site_id).is_file():
        raise typer.BadParameter(f"no key {creds.site_private_key(site_id)}; ask the coordinator for it")
    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder")
    policy = load_settings(config).policy
    consent = SiteConsent(policy.consent_ledger, policy.audit_key, policy.audit_log, policy.consent_file)
    if not consent.ledger.is_file():
        raise typer.BadParameter(f"no consent ledger at {consent.ledger} (policy.consent_ledger): record consent "
                                 "first; without it this site would decline every round")
    process = start_supernode(site_id, creds, superlink=superlink, data_dir=data_dir, state_dir=state_dir,
                              runtime_port=runtime_port, consent=consent)
    typer.echo(f"site {site_id} connected to {superlink}; log {process.log_path}; every message this site sends is "
               f"recorded in {state_dir / 'outbox'}. Ctrl-C stops.")
    try:
        process.popen.wait()
    except KeyboardInterrupt:
        pass
    finally:
        process.stop()


@client.command()
def personalise(person_dir: Path = typer.Argument(..., help="Photos of one consenting person."),
                state_dir: Path = typer.Option(..., help="The site's state folder (holds the global adapter)."),
                person_ref: str = typer.Option(..., help="Pseudonymous reference (a hash), never a name."),
                out: Path = typer.Option(..., help="Where to write the adapter (.safetensors)."),
                steps: Optional[int] = typer.Option(None)) -> None:
    """Fine-tune a per-person adapter from the latest global adapter, locally, with the person's personal_adapter
    consent (checked in the site's consent ledger before and after training). Nothing is sent anywhere."""
    from safetensors.torch import save_file

    from megaportrait.client.faces import intake_photos
    from megaportrait.client.federation import SiteConsent, load_global_adapter, personalise_adapter
    from megaportrait.shared.config import FaceSettings, load_settings

    loaded = load_settings()
    settings, policy = loaded.identity, loaded.policy
    consent = SiteConsent(policy.consent_ledger, policy.audit_key, policy.audit_log, policy.consent_file)
    arrays, round_ = load_global_adapter(state_dir)
    photos = sorted(p for p in person_dir.iterdir() if p.is_file())
    report = intake_photos(photos, FaceSettings(crop_size=settings.resolution))
    for origin, reason in report.reasons().items():
        typer.echo(f"rejected {Path(origin).name}: {reason}")
    with consent.open("site", component="client-cli") as ledger:
        adapter = personalise_adapter(report.crops, settings, person_ref=person_ref, global_arrays=arrays,
                                      steps=steps, progress=True, ledger=ledger, actor="operator:cli")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.lora_state.items()}, str(out),
              metadata={"person_ref": person_ref, "global_round": str(round_),
                        "epsilon": str(adapter.privacy.epsilon), "delta": str(adapter.privacy.delta)})
    typer.echo(f"adapter for {person_ref[:12]} from global round {round_}: {out} (epsilon "
               f"{adapter.privacy.epsilon:.3g} for this personalisation)")


@client.command()
def privacy(state_dir: Path = typer.Option(..., help="The site's state folder.")) -> None:
    """This site's cumulative epsilon for the global adapter, from its Opacus accountant history."""
    from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger

    ledger = SitePrivacyLedger(state_dir / LEDGER_FILE)
    typer.echo(json.dumps({"epsilon": ledger.epsilon(), "delta": ledger.delta, "accountant": ledger.accountant,
                           "releases": len(ledger.history), "rounds": ledger.rounds}, indent=1))
