"""`megaportrait audit`: verify, review and export audit logs; keys, reviewer credentials and policy checks.

Only typer-level code runs at import; everything else is imported inside the commands.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Audit log: verify, review, export; signing keys; reviewer page; policy checks.", no_args_is_help=True)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _settings():  # type: ignore[no-untyped-def]
    from .config import load_settings

    return load_settings()


def _default_log() -> Path:
    return _settings().policy.audit_log


def _default_pub() -> Path:
    return Path(f"{_settings().policy.audit_key}.pub")


LogsArg = Annotated[Optional[list[Path]], typer.Argument(help="Audit log files (default: policy.audit_log from the config).")]


@app.command()
def verify(
    log: Annotated[Optional[Path], typer.Argument(help="Audit log (default: policy.audit_log).")] = None,
    public_key: Annotated[Optional[str], typer.Option("--public-key", "-k", help="Writer's public key: 64 hex chars or a .pub file.")] = None,
    trusted: Annotated[Optional[Path], typer.Option(help="Checkpoints kept elsewhere (a .checkpoints file copy).")] = None,
    witness: Annotated[Optional[list[Path]], typer.Option(help="A witness directory (checkpoints other components kept "
                                                          "of this log); repeatable.")] = None,  # fmt: skip
) -> None:
    """Check every entry's hash, signature and place in the chain; exit 1 and say where if anything is wrong.

    With --witness, also against every checkpoint of this log's key that others kept: entries cut from the end are
    named even when the log's own checkpoint file was cut too.
    """
    from rich.console import Console

    from . import audit

    path = log or _default_log()
    key = public_key or str(_default_pub())
    console = Console(stderr=True)
    try:
        extra = []
        if trusted:
            extra = audit.read_checkpoints(str(trusted).removesuffix(".checkpoints"))
        for directory in witness or []:
            if not directory.is_dir():
                raise audit.AuditError(f"witness directory {directory} does not exist")
            kept = audit.WitnessStore(directory).checkpoints(audit.load_public_key(key))
            typer.echo(f"{directory}: {len(kept)} witnessed checkpoint(s) of this log's key", err=True)
            extra += kept
        with console.status(f"verifying {path}"):
            report = audit.verify(path, key, trusted_checkpoints=extra)
    except audit.AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)


@app.command("list")
def list_entries(
    logs: LogsArg = None,
    person: Annotated[str, typer.Option(help="Only this person_ref.")] = "",
    site: Annotated[str, typer.Option(help="Only this component/site (e.g. 'site:alpha' or 'alpha').")] = "",
    action: Annotated[str, typer.Option(help="Only this action or action prefix (e.g. 'consent').")] = "",
    outcome: Annotated[str, typer.Option(help="ok, refused or failed.")] = "",
    since: Annotated[Optional[datetime], typer.Option(help="From this time (UTC unless an offset is given).")] = None,
    until: Annotated[Optional[datetime], typer.Option(help="Up to this time.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Show or export the entries that match every filter given, merged across logs in time order."""
    import csv
    import io
    import json

    from . import audit

    paths = logs or [_default_log()]
    flt = audit.EntryFilter(person=person, site=site, action=action, outcome=outcome, since=since, until=until)
    try:
        entries = audit.filter_entries(paths, flt)
    except (OSError, audit.AuditError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if fmt is Format.json:
        text = json.dumps([e.to_json() for e in entries], indent=1) + "\n"
    elif fmt is Format.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=audit.CSV_COLUMNS)
        writer.writeheader()
        for e in entries:
            writer.writerow(audit.entry_row(e))
        text = buf.getvalue()
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(entries)} entries")
        for col in ("time", "component", "seq", "actor", "action", "person", "outcome", "detail"):
            table.add_column(col)
        for e in entries:
            r = audit.entry_row(e)
            table.add_row(r["ts"], r["component"], r["seq"], r["actor"], r["action"], r["person"][:16], r["outcome"], r["detail"][:60])
        Console(file=output.open("w") if output else None, width=200).print(table)
        return
    if output:
        output.write_text(text)
        typer.echo(f"wrote {len(entries)} entries to {output}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command()
def checkpoint(
    log: Annotated[Optional[Path], typer.Argument()] = None,
    key: Annotated[Optional[Path], typer.Option(help="Signing key (default: policy.audit_key).")] = None,
    component: Annotated[str, typer.Option(help="Component name (only used for new entries).")] = "cli",
) -> None:
    """Sign a checkpoint of the log's current size and head."""
    from . import audit

    s = _settings().policy
    cp = audit.AuditLog(log or s.audit_log, audit.load_signing_key(key or s.audit_key), component=component).checkpoint()
    typer.echo(f"checkpoint: size {cp.size}, head {cp.head}")


@app.command()
def keygen(path: Annotated[Path, typer.Argument(help="Where to write the private key; the public key goes to <path>.pub.")]) -> None:
    """Create a component's Ed25519 signing key."""
    from . import audit

    try:
        key = audit.generate_signing_key(path)
    except audit.AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path}.pub: {audit.public_key_hex(key)}")


@app.command("hash-password")
def hash_password_cmd() -> None:
    """Hash a reviewer password for `policy.reviewers` in the config (the password itself is never stored)."""
    from megaportrait.server.audit_review import hash_password

    password = typer.prompt("reviewer password", hide_input=True, confirmation_prompt=True)
    typer.echo(hash_password(password))


@app.command("check-policies")
def check_policies(
    consent: Annotated[Optional[Path], typer.Option(help="Default: policy.consent_file.")] = None,
    retention: Annotated[Optional[Path], typer.Option(help="Default: policy.retention_file.")] = None,
) -> None:
    """Validate the consent and retention policies; print their version hashes or the file and line at fault."""
    from .policy import PolicyError, load_policies

    s = _settings().policy
    try:
        p = load_policies(consent or s.consent_file, retention or s.retention_file)
    except PolicyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{p.consent.path}: OK, version {p.consent.version_hash}, purposes: {', '.join(p.consent.purposes)}")
    typer.echo(f"{p.retention.path}: OK, version {p.retention.version_hash}")


@app.command()
def serve(
    logs: LogsArg = None,
    public_key: Annotated[Optional[list[str]], typer.Option("--public-key", "-k", help="One per log, in the same order.")] = None,
    listen: Annotated[Optional[str], typer.Option(help="host:port (default: policy.review_listen).")] = None,
    logs_dir: Annotated[Optional[Path], typer.Option(help="Also every <component>.jsonl in this folder ...")] = None,
    keys_dir: Annotated[Optional[Path], typer.Option(help="... each verified with <component>.pub from this folder.")] = None,
) -> None:
    """Serve the read-only reviewer page (HTTP Basic, reviewers from `policy.reviewers`) over the LOGS given and
    every log in --logs-dir (a component's log and key named alike: coordinator.jsonl, coordinator.pub)."""
    import uvicorn

    from megaportrait.server.audit_review import ReviewedLog, create_review_app

    from . import audit

    s = _settings().policy
    if (logs_dir is None) != (keys_dir is None):
        typer.echo("error: --logs-dir and --keys-dir go together", err=True)
        raise typer.Exit(2)
    folder_logs = sorted(logs_dir.glob("*.jsonl")) if logs_dir is not None else []
    if logs_dir is not None:
        missing = [p.stem for p in folder_logs if not (keys_dir / f"{p.stem}.pub").is_file()]
        if not folder_logs or missing:
            why = f"no <component>.jsonl in {logs_dir}" if not folder_logs else f"no key {keys_dir}/<component>.pub for {missing}"
            typer.echo(f"error: {why}", err=True)
            raise typer.Exit(2)
    named = list(logs or ([] if folder_logs else [s.audit_log]))
    named_keys = public_key or [str(Path(f"{s.audit_key}.pub"))] * len(named)
    paths = named + folder_logs
    keys = named_keys + [str(keys_dir / f"{p.stem}.pub") for p in folder_logs]
    if len(named_keys) != len(named):
        typer.echo("error: give one --public-key per log", err=True)
        raise typer.Exit(2)
    try:
        app_ = create_review_app([ReviewedLog(Path(p), audit.load_public_key(k)) for p, k in zip(paths, keys)], s.reviewers)
    except (ValueError, audit.AuditError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    host, _, port = (listen or s.review_listen).rpartition(":")
    uvicorn.run(app_, host=host or "127.0.0.1", port=int(port))
