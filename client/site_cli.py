"""`megaportrait client consent|enrol|render|jobs|revoke|status|console`: a site's day-to-day work, over the site
settings file (`site.yaml`: `site`, `policy` and `faces` sections). Every action is audited in the site's log by
the functions it calls (`client.consent_capture`, `client.enrolment`, `client.render_requests`,
`client.revocation`); the staff console (`client.console`) calls the same ones."""
from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, List, Optional

import typer

CONFIG = typer.Option(None, "--config", help="Site settings (site.yaml); default $MEGAPORTRAIT_CONFIG.")
ACTOR = "operator:cli"

consent_app = typer.Typer(help="Record and read people's consent (purposes from policies/consent.yaml).",
                          no_args_is_help=True)
jobs_app = typer.Typer(help="The site's render jobs: list, show, fetch, cancel, delete.", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def open_site_cli(config: Optional[Path]) -> Iterator[tuple]:
    """(settings, open Site) from the settings file; a bad file or missing key exits 2 with the cause."""
    from megaportrait.client.site import open_site
    from megaportrait.shared.config import load_settings
    from megaportrait.shared.errors import MegaPortraitError

    try:
        settings = load_settings(config)
        site = open_site(settings)
    except (MegaPortraitError, OSError) as exc:
        _fail(str(exc), 2)
    try:
        yield settings, site
    finally:
        site.close()


@contextmanager
def node_connection(settings) -> Iterator:
    """The render node connection as `site.render_node` says; unreachable or misconfigured exits 3 with the fix."""
    from megaportrait.client.render_requests import connect
    from megaportrait.shared.errors import MegaPortraitError

    try:
        conn = connect(settings.site.render_node)
    except MegaPortraitError as exc:
        _fail(str(exc), 3)
    try:
        yield conn
    finally:
        conn.close()


def _known_person(site, person: str) -> None:
    from megaportrait.client.consent_capture import check_person_ref
    from megaportrait.shared.errors import MegaPortraitError

    try:
        check_person_ref(person)
    except MegaPortraitError as exc:
        _fail(str(exc), 2)
    if person not in site.people():
        _fail(f"unknown person {person!r} at site {site.site_id}: record their consent first "
              f"(`megaportrait client consent grant {person} --purposes ...`); `megaportrait client consent list` "
              "shows the people the site knows", 2)


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """`--expires`: an ISO date/time (UTC if no zone) or a duration from now (`30d`, `12w`, `6m` months=30d)."""
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"\s*(\d+)\s*([dwmy])\s*", text)
    if m:
        days = {"d": 1, "w": 7, "m": 30, "y": 365}[m.group(2)] * int(m.group(1))
        return now + timedelta(days=days)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a date (2027-03-01) nor a duration (90d, 12w, 6m, 1y)",
                                 param_hint="--expires") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------------ consent


@consent_app.command("grant")
def consent_grant(person: str = typer.Argument(..., help="The person's pseudonymous reference (never a name)."),
                  purposes: List[str] = typer.Option(..., "--purposes", help="Purposes, comma-separated or repeated."),
                  expires: Optional[str] = typer.Option(None, help="Expiry: a date or a duration (90d) [the "
                                                                     "policy's longest for these purposes]."),
                  granted_by: str = typer.Option("subject", help="Who grants it: subject, guardian or "
                                                                 "legal_representative (as the policy allows)."),
                  config: Optional[Path] = CONFIG) -> None:
    """Record a person's consent: a signed receipt in the site's ledger, audited."""
    from megaportrait.client.consent_capture import grant_consent
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (_, site):
        try:
            receipt = grant_consent(site, person, purposes, granted_by=granted_by,
                                    expires_at=parse_expiry(expires) if expires else None, actor=ACTOR)
        except MegaPortraitError as exc:
            _fail(str(exc), 2)
        typer.echo(f"consent {receipt.receipt_id[:12]} for {person}: {', '.join(receipt.purposes)} until "
                   f"{receipt.expires_at:%Y-%m-%d %H:%M} UTC, granted by {receipt.granted_by}")


@consent_app.command("show")
def consent_show(person: str = typer.Argument(...), config: Optional[Path] = CONFIG) -> None:
    """Every consent receipt of one person and its state now."""
    from megaportrait.client.consent_capture import consent_of

    with open_site_cli(config) as (_, site):
        _known_person(site, person)
        for line in consent_of(site, person):
            ended = f", revoked {line.revoked_at:%Y-%m-%d %H:%M}" if line.revoked_at else ""
            typer.echo(f"{line.receipt_id[:12]}  {line.state:<8} {','.join(line.purposes):<60} until "
                       f"{line.expires_at:%Y-%m-%d} by {line.granted_by}{ended}")


@consent_app.command("list")
def consent_list(config: Optional[Path] = CONFIG) -> None:
    """The people the site knows and the purposes their consent covers now."""
    from megaportrait.client.consent_capture import active_purposes

    with open_site_cli(config) as (_, site):
        people = site.people()
        if not people:
            typer.echo("no people recorded at this site yet")
        for ref in people:
            purposes = active_purposes(site, ref)
            typer.echo(f"{ref:<24} {', '.join(purposes) if purposes else '(no active consent)'}")


# ------------------------------------------------------------------------------------------------ enrol


def enrol(person: str = typer.Argument(..., help="The person's reference (their consent must be recorded)."),
          photos: List[Path] = typer.Argument(..., help="Photo files, or a folder of them."),
          config: Optional[Path] = CONFIG) -> None:
    """Take a person's photos in: each is checked (one clear face, sharp, lit, big enough); accepted ones are stored
    in the site's photo store, refused ones are printed with their reason and not kept."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from megaportrait.client.enrolment import enrol_photos, photo_files
    from megaportrait.shared.errors import MegaPortraitError
    from megaportrait.shared.face_analysis import FaceAnalyzer

    with open_site_cli(config) as (settings, site):
        _known_person(site, person)
        try:
            files = photo_files(photos)
        except FileNotFoundError as exc:
            _fail(str(exc), 2)
        if not files:
            _fail(f"no photos in {', '.join(map(str, photos))}", 2)
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task("checking photos", total=len(files))
                done = enrol_photos(site, person, ((f.name, f.read_bytes()) for f in files),
                                    FaceAnalyzer(settings.faces), settings.faces, actor=ACTOR,
                                    advance=lambda: bar.advance(task))
        except MegaPortraitError as exc:
            _fail(str(exc), 1)
        for name in done.accepted_files:
            typer.echo(f"accepted {name}")
        for name in done.already_enrolled:
            typer.echo(f"already enrolled {name}")
        for r in done.refused:
            typer.echo(f"refused  {r.file}: {r.reason} ({r.detail})")
        typer.echo(f"{person}: {len(done.accepted)} accepted, {len(done.refused)} refused, "
                   f"{len(site.photos.find_person(person))} photo(s) held")


# ------------------------------------------------------------------------------------------------ render


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _figures_line(figures: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    tone = {True: "kept", False: "NOT kept", None: "n/a"}[figures.get("tone_kept")]
    return (f"identity {f(figures.get('identity'), '.3f')} (site, held-out photos), "
            f"{f(figures.get('identity_payload'), '.3f')} (node, payload); skin tone ITA person "
            f"{f(figures.get('ita_person'), '.1f')}, template {f(figures.get('ita_template'), '.1f')}, portrait "
            f"{f(figures.get('ita_output'), '.1f')} ({tone})")


def _save(portrait, out: Optional[Path]) -> Path:
    if out is None:
        return portrait.path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(portrait.png)
    return out


def _collect_and_print(site, conn, rec, analyzer, held_out, out: Optional[Path]) -> None:
    from megaportrait.client.render_requests import wait_for_portrait
    from megaportrait.shared.consent import ConsentError
    from megaportrait.shared.errors import MegaPortraitError

    try:
        with _progress_bar() as bar:
            task = bar.add_task(f"job {rec.job_id[-24:]}", total=1.0)

            def on_progress(stage: str, fraction: float, state: str) -> None:
                bar.update(task, completed=fraction, description=f"{state} {stage}".strip())

            job, portrait = wait_for_portrait(site, conn, rec.job_id, analyzer=analyzer, held_out=held_out,
                                              on_progress=on_progress, actor=ACTOR)
    except ConsentError as exc:
        _fail(f"job {rec.job_id}: {exc}; the job was deleted at the render node and no portrait was saved", 1)
    except MegaPortraitError as exc:
        _fail(f"job {rec.job_id}: {exc}", 1)
    if portrait is None and not job.finished:
        _fail(f"job {job.job_id} is still {job.state} at the node, which stopped reporting; run the same command "
              f"again (or `megaportrait client jobs fetch {job.job_id}`) to pick it up", 1)
    if portrait is None:
        _fail(f"job {job.job_id} {job.state}: {job.error or 'no portrait'}", 1)
    path = _save(portrait, out)
    typer.echo(f"portrait {path} (job {job.job_id}, {job.backend})")
    typer.echo(f"label    {portrait.metadata.get('provenance', '')}")
    typer.echo(_figures_line(portrait.figures))


def render(person: str = typer.Argument(...),
           template: Path = typer.Argument(..., help="A template portrait (PNG or JPEG) with one clear face."),
           backend: str = typer.Option("classic", help="classic (sends face crops) or diffusion (sends the "
                                                       "person's adapter from `client personalise`)."),
           stages: str = typer.Option("identity,shading,harmonize", help="Stages to run, comma-separated."),
           seed: int = typer.Option(0),
           out: Optional[Path] = typer.Option(None, help="Also write the portrait here."),
           detach: bool = typer.Option(False, "--detach", help="Submit and print the job id; fetch later with "
                                                               "`client jobs fetch`."),
           config: Optional[Path] = CONFIG) -> None:
    """Render a person onto a template at the render node: consent checked, payload sealed and submitted over mTLS,
    progress shown, portrait fetched, its provenance label checked and saved. Re-running the same command picks up
    the same job."""
    from megaportrait.client.render_requests import (
        BACKEND_PURPOSE,
        RenderRequest,
        parse_stages,
        submit_render,
    )
    from megaportrait.shared.errors import MegaPortraitError

    if backend not in BACKEND_PURPOSE:
        raise typer.BadParameter(f"{backend!r}: choose classic or diffusion", param_hint="--backend")
    with open_site_cli(config) as (settings, site):
        _known_person(site, person)
        try:
            switches = parse_stages(stages)
            data = template.read_bytes()
        except OSError as exc:
            _fail(f"template {template}: {exc.strerror or exc}", 2)
        except MegaPortraitError as exc:
            _fail(str(exc), 2)
        request = RenderRequest(person_ref=person, template_name=template.name, template=data, backend=backend,
                                stages=switches, seed=seed)
        with node_connection(settings) as conn:
            from megaportrait.client.render_payloads import check_template, payload_and_held_out, person_photos

            try:
                analyzer = check_template(data, template.name, settings.faces)
                photos = person_photos(site, person, analyzer, settings.faces)
                payload, held_out = payload_and_held_out(site, person, backend, photos)
                rec = submit_render(site, conn, request, payload, actor=ACTOR)
            except MegaPortraitError as exc:
                _fail(str(exc), 1)
            typer.echo(f"job {rec.job_id} {rec.state}")
            if detach:
                return
            _collect_and_print(site, conn, rec, analyzer, held_out, out)


# ------------------------------------------------------------------------------------------------ jobs


@jobs_app.command("list")
def jobs_list(person: Optional[str] = typer.Option(None, help="Only this person's jobs."),
              refresh: bool = typer.Option(False, help="Ask the node for the state of unfinished jobs."),
              config: Optional[Path] = CONFIG) -> None:
    """The site's render jobs, oldest first."""
    from megaportrait.client.render_requests import refresh as refresh_job

    with open_site_cli(config) as (settings, site):
        jobs = site.jobs.all(person)
        if refresh and any(not j.finished for j in jobs):
            with node_connection(settings) as conn:
                jobs = [refresh_job(site, conn, j.job_id) for j in jobs]
        if not jobs:
            typer.echo("no jobs")
        for j in jobs:
            typer.echo(f"{j.job_id:<48} {j.state:<10} {j.person_ref:<16} {j.backend:<9} {j.template:<20} "
                       f"{j.created_at}")


@jobs_app.command("show")
def jobs_show(job_id: str = typer.Argument(...), config: Optional[Path] = CONFIG) -> None:
    """One job: its request, state, error and the site's figures on its portrait."""
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (_, site):
        try:
            j = site.jobs.get(job_id)
        except MegaPortraitError as exc:
            _fail(str(exc), 2)
        for k in ("job_id", "person_ref", "state", "backend", "template", "stages", "seed", "created_at",
                  "updated_at", "error", "portrait_item"):
            typer.echo(f"{k:<14} {getattr(j, k)}")
        if j.figures:
            typer.echo(_figures_line(j.figures))


@jobs_app.command("fetch")
def jobs_fetch(job_id: str = typer.Argument(...), out: Optional[Path] = typer.Option(None),
               config: Optional[Path] = CONFIG) -> None:
    """Follow a job to its end and fetch its portrait (a job submitted with --detach, or interrupted)."""
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (settings, site):
        try:
            rec = site.jobs.get(job_id)
        except MegaPortraitError as exc:
            _fail(str(exc), 2)
        with node_connection(settings) as conn:
            _collect_and_print(site, conn, rec, None, [], out)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(...), config: Optional[Path] = CONFIG) -> None:
    """Cancel a queued or running job at the node."""
    from megaportrait.client.render_requests import cancel_job
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (settings, site), node_connection(settings) as conn:
        try:
            rec = cancel_job(site, conn, job_id, actor=ACTOR)
        except MegaPortraitError as exc:
            _fail(str(exc), 1)
        typer.echo(f"job {rec.job_id} {rec.state}")


@jobs_app.command("delete")
def jobs_delete(job_ids: List[str] = typer.Argument(...), config: Optional[Path] = CONFIG) -> None:
    """Delete jobs at the node (its signed statement verified) and their portraits and payloads at the site."""
    from megaportrait.client.render_requests import delete_jobs
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (settings, site), node_connection(settings) as conn:
        try:
            conf = delete_jobs(site, conn, list(job_ids), actor=ACTOR)
        except MegaPortraitError as exc:
            _fail(str(exc), 1)
        node = (f"node {conf.node}: {len(conf.job_ids)} deleted, {conf.keys_destroyed} key(s) destroyed, signed "
                "statement verified") if conf else "node: none of them held any more"
        typer.echo(f"deleted {len(job_ids)} job(s) at the site; {node}")


# ------------------------------------------------------------------------------------------------ revoke, status


def revoke(person: str = typer.Argument(...),
           yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
           config: Optional[Path] = CONFIG) -> None:
    """Revoke a person's consent and delete their data at the site and at the render node (its signed statement
    verified); prints what was deleted where. Exit 1 if any deletion could not be verified."""
    from megaportrait.client.revocation import revoke as revoke_person
    from megaportrait.client.render_requests import connect
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (settings, site):
        _known_person(site, person)
        if not yes and not typer.confirm(f"revoke all consent of {person} and delete their data everywhere?"):
            _fail("not revoked", 1)
        conn = None
        try:
            conn = connect(settings.site.render_node)
        except MegaPortraitError as exc:
            typer.echo(f"warning: {exc}; the node's deletion is owed and retried by the next `client revoke`",
                       err=True)
        try:
            done = revoke_person(site, person, conn, by="subject")
        finally:
            if conn is not None:
                conn.close()
        for line in done.lines():
            typer.echo(line)
        if not done.complete:
            raise typer.Exit(1)


def status(config: Optional[Path] = CONFIG) -> None:
    """The site at a glance: people and their consent, the site's epsilon, pending jobs and whether the render
    node answers."""
    from megaportrait.client.consent_capture import active_purposes
    from megaportrait.client.federation import LEDGER_FILE, SitePrivacyLedger
    from megaportrait.client.render_requests import connect
    from megaportrait.shared.errors import MegaPortraitError

    with open_site_cli(config) as (settings, site):
        people = site.people()
        typer.echo(f"site {site.site_id}: {len(people)} {'person' if len(people) == 1 else 'people'}")
        for ref in people:
            purposes = active_purposes(site, ref)
            photos = len(site.photos.find_person(ref))
            typer.echo(f"  {ref:<24} {photos} photo(s); consent: {', '.join(purposes) or 'none active'}")
        ledger_path = Path(settings.site.state_dir) / LEDGER_FILE
        if ledger_path.is_file():
            ledger = SitePrivacyLedger(ledger_path)
            typer.echo(f"privacy: epsilon {ledger.epsilon():.3g} at delta {ledger.delta:g} over "
                       f"{len(ledger.history)} release(s) ({ledger.accountant} accountant)")
        else:
            typer.echo("privacy: no federated rounds yet (epsilon 0)")
        pending = [j for j in site.jobs.all() if not j.finished]
        typer.echo(f"jobs: {len(pending)} pending of {len(site.jobs.all())}")
        for j in pending:
            typer.echo(f"  {j.job_id} {j.state} ({j.person_ref})")
        owed = site.ledger.pending_render_deletions()
        if owed:
            typer.echo(f"revocations owed by the render node: {', '.join(p for p, _ in owed)}")
        link = settings.site.render_node
        try:
            conn = connect(link)
            typer.echo(f"render node {conn.node_id} at {link.address}: reachable, keys match node_public.json")
            conn.close()
        except MegaPortraitError as exc:
            typer.echo(f"render node at {link.address}: NOT usable: {exc}")


def console(listen: str = typer.Option("127.0.0.1:8089", help="host:port; loopback by default (put a TLS proxy "
                                                               "in front before listening elsewhere)."),
            config: Optional[Path] = CONFIG) -> None:
    """Serve the staff web console (consent, photos, renders, gallery, revocation) until Ctrl-C. Staff sign in
    with the reviewer credentials in policy.reviewers (`megaportrait audit hash-password`)."""
    import uvicorn

    from megaportrait.client.console import create_console_app

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{listen!r} is not host:port", param_hint="--listen")
    with open_site_cli(config) as (settings, site):
        try:
            app = create_console_app(settings, settings.policy.reviewers, site=site)
        except ValueError as exc:
            _fail(str(exc), 2)
        typer.echo(f"site console for {site.site_id} on http://{listen}/ (Ctrl-C stops it)")
        uvicorn.run(app, host=host.strip("[]"), port=int(port), log_level="warning")


def register(client: typer.Typer) -> None:
    """Attach the day-to-day commands to `megaportrait client`."""
    client.add_typer(consent_app, name="consent")
    client.command("enrol")(enrol)
    client.command("render")(render)
    client.add_typer(jobs_app, name="jobs")
    client.command("revoke")(revoke)
    client.command("status")(status)
    client.command("console")(console)
