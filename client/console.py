"""The staff web console (`megaportrait client console`): the site's day-to-day flows as pages, over the same
functions as the CLI (`client.consent_capture`, `client.enrolment`, `client.render_requests`, `client.revocation`).

Staff sign in with HTTP Basic against the reviewer hashes in `policy.reviewers`, as on the audit review page, and
every page sends that page's security headers; personal data is never cached (`Cache-Control: no-store`). Every
form carries a per-user token, so another site cannot post to the console through a signed-in browser. Render
progress is shown by the job page reloading itself (no script runs in the page).
"""
# No `from __future__ import annotations`: FastAPI resolves the routes' dependency annotations at runtime.

import hashlib
import hmac
import html
import secrets
import threading
from pathlib import Path
from typing import Annotated, Any, List, Mapping, Optional
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, HTTPException, UploadFile, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from megaportrait.shared.errors import MegaPortraitError

ACTOR_PREFIX = "staff:"
MAX_UPLOAD_BYTES = 25 * 1024 * 1024

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:70rem}
nav a{margin-right:1rem}table{border-collapse:collapse;font-size:.9rem}td,th{border:1px solid #ccc;padding:.25rem .5rem}
th{background:#f3f3f3}.ok{color:#0a6b2b}.bad{color:#a40000}.note{color:#555;font-size:.85rem}
fieldset{margin:.8rem 0;border:1px solid #ccc}label{display:inline-block;margin:.2rem .8rem .2rem 0}
.gallery{display:flex;flex-wrap:wrap;gap:1rem}.card{border:1px solid #ccc;padding:.5rem;width:16rem;font-size:.8rem}
.card img{width:100%}.label{background:#fff4c2;padding:.15rem .3rem;font-weight:600}
progress{width:24rem;height:1.2rem}
"""


def _page(title: str, body: str, *, refresh: Optional[int] = None) -> HTMLResponse:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return HTMLResponse(f"""<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}
<title>{html.escape(title)} · MegaPortrait site console</title><style>{_CSS}</style></head><body>
<nav><b>MegaPortrait site console</b> · <a href="/">people</a><a href="/gallery">gallery</a><a href="/jobs">jobs</a></nav>
<h1>{html.escape(title)}</h1>{body}</body></html>""")


def create_console_app(settings: Any, reviewers: Mapping[str, str], *, site: Any = None) -> FastAPI:
    """The console over the site `settings` describe (or an open `site`); `reviewers`: name -> password hash."""
    from megaportrait.client import consent_capture, render_requests
    from megaportrait.client.enrolment import enrol_photos
    from megaportrait.client.render_payloads import check_template, payload_and_held_out, person_photos
    from megaportrait.client.revocation import revoke
    from megaportrait.client.site import open_site
    from megaportrait.server.audit_review import check_password
    from megaportrait.shared.face_analysis import FaceAnalyzer

    if not reviewers:
        raise ValueError("no staff configured: add `policy.reviewers` (name: hash from `megaportrait audit "
                         "hash-password`)")
    for name, hashed in reviewers.items():
        if not hashed.startswith("scrypt$"):
            raise ValueError(f"staff member {name!r}: credential must be a hash from `megaportrait audit "
                             "hash-password`, not a password")
    site = site or open_site(settings)
    app = FastAPI(title="MegaPortrait site console", docs_url=None, redoc_url=None, openapi_url=None)
    basic = HTTPBasic(realm="megaportrait-site")
    secret = secrets.token_bytes(32)
    lock = threading.RLock()  # one site, one node connection: requests take turns
    state: dict = {"conn": None, "analyzer": None, "held_out": {}}
    templates_dir = Path(settings.site.state_dir) / "templates"
    templates_dir.mkdir(parents=True, exist_ok=True)
    purposes = list(site.ledger.policy.purposes)

    def staff(creds: Annotated[HTTPBasicCredentials, Depends(basic)]) -> str:
        hashed = reviewers.get(creds.username)
        ok = check_password(creds.password, hashed or next(iter(reviewers.values())))
        if not (hashed and ok):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown staff member or wrong password",
                                headers={"WWW-Authenticate": 'Basic realm="megaportrait-site"'})
        return creds.username

    def token(who: str) -> str:
        return hmac.new(secret, who.encode(), hashlib.sha256).hexdigest()

    def hidden(who: str) -> str:
        return f'<input type="hidden" name="csrf" value="{token(who)}">'

    def check_token(who: str, value: str) -> None:
        if not hmac.compare_digest(value, token(who)):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "form token missing or stale: reload the page")

    def conn():
        if state["conn"] is None:
            state["conn"] = render_requests.connect(settings.site.render_node)
        return state["conn"]

    def analyzer():
        if state["analyzer"] is None:
            state["analyzer"] = FaceAnalyzer(settings.faces)
        return state["analyzer"]

    def error_page(title: str, exc: Exception, back: str) -> HTMLResponse:
        resp = _page(title, f'<p class="bad" id="error">{html.escape(str(exc))}</p><p><a href="{back}">back</a></p>')
        resp.status_code = status.HTTP_400_BAD_REQUEST if isinstance(exc, MegaPortraitError) else 500
        return resp

    @app.middleware("http")
    async def headers(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                                                       "form-action 'self'")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.on_event("shutdown")
    def close() -> None:
        if state["conn"] is not None:
            state["conn"].close()

    # ------------------------------------------------------------------------------------------------ people

    @app.get("/", response_class=HTMLResponse)
    def people(who: Annotated[str, Depends(staff)]) -> HTMLResponse:
        with lock:
            rows = "".join(
                f'<tr class="person"><td><a href="/person/{quote(ref)}">{html.escape(ref)}</a></td>'
                f"<td>{html.escape(', '.join(consent_capture.active_purposes(site, ref)) or 'no active consent')}</td>"
                f"<td>{len(site.photos.find_person(ref))}</td></tr>" for ref in site.people())
        boxes = "".join(f'<label><input type="checkbox" name="purposes" value="{p}"> {p}</label>' for p in purposes)
        body = f"""<p>Signed in as <b id="staff">{html.escape(who)}</b>. People are named by a pseudonymous
reference, never by name.</p>
<table id="people"><tr><th>person</th><th>consent now</th><th>photos</th></tr>{rows}</table>
<h2>Capture consent</h2><form method="post" action="/consent" id="consent-form">{hidden(who)}
<label>person reference <input name="person" required pattern="[A-Za-z0-9][A-Za-z0-9._-]*"></label>
<fieldset><legend>purposes (policies/consent.yaml)</legend>{boxes}</fieldset>
<label>expires <input name="expires" placeholder="90d or 2027-03-01"></label>
<label>granted by <select name="granted_by"><option>subject</option><option>guardian</option>
<option>legal_representative</option></select></label>
<button type="submit">Record consent</button></form>"""
        return _page("People and consent", body)

    @app.post("/consent")
    def grant(who: Annotated[str, Depends(staff)], person: Annotated[str, Form()], csrf: Annotated[str, Form()],
              purposes: Annotated[List[str], Form()] = [], expires: Annotated[str, Form()] = "",  # noqa: B006
              granted_by: Annotated[str, Form()] = "subject") -> Response:
        from megaportrait.client.site_cli import parse_expiry

        check_token(who, csrf)
        try:
            with lock:
                consent_capture.grant_consent(site, person.strip(), purposes, granted_by=granted_by,
                                              expires_at=parse_expiry(expires) if expires.strip() else None,
                                              actor=ACTOR_PREFIX + who)
        except (MegaPortraitError, ValueError) as exc:
            return error_page("Consent not recorded", exc, "/")
        return RedirectResponse(f"/person/{quote(person.strip())}", status_code=303)

    @app.get("/person/{ref}", response_class=HTMLResponse)
    def person_page(ref: str, who: Annotated[str, Depends(staff)]) -> HTMLResponse:
        with lock:
            if ref not in site.people():
                raise HTTPException(404, f"unknown person {ref!r}: record their consent first")
            lines = consent_capture.consent_of(site, ref)
            photos = len(site.photos.find_person(ref))
            jobs = site.jobs.all(ref)
        consent_rows = "".join(
            f'<tr class="receipt {c.state}"><td>{c.receipt_id[:12]}</td><td>{html.escape(", ".join(c.purposes))}</td>'
            f"<td>{c.granted_by}</td><td>{c.expires_at:%Y-%m-%d}</td><td>{c.state}</td></tr>" for c in lines)
        options = "".join(f"<option>{html.escape(p.name)}</option>" for p in sorted(templates_dir.glob("*"))
                          if p.is_file())
        job_rows = "".join(f'<tr><td><a href="/jobs/{quote(j.job_id)}">{html.escape(j.job_id)}</a></td>'
                           f"<td>{j.state}</td><td>{html.escape(j.template)}</td></tr>" for j in jobs)
        e = quote(ref)
        body = f"""<table id="consent"><tr><th>receipt</th><th>purposes</th><th>granted by</th><th>until</th>
<th>state</th></tr>{consent_rows}</table>
<h2>Photos ({photos} held)</h2>
<form method="post" action="/person/{e}/photos" enctype="multipart/form-data" id="upload-form">{hidden(who)}
<input type="file" name="photos" multiple accept="image/*" required> <button type="submit">Upload</button></form>
<p class="note">Each photo is checked: one clear face, sharp, lit, big enough. Refused photos are not kept.</p>
<h2>Render a portrait</h2>
<form method="post" action="/person/{e}/render" enctype="multipart/form-data" id="render-form">{hidden(who)}
<label>template <select name="template"><option value="">(upload below)</option>{options}</select></label>
<label>or upload <input type="file" name="template_file" accept="image/*"></label>
<label>backend <select name="backend"><option>classic</option><option>diffusion</option></select></label>
<button type="submit">Render</button></form>
<h2>Jobs</h2><table id="jobs"><tr><th>job</th><th>state</th><th>template</th></tr>{job_rows}</table>
<h2>Revoke</h2><p><a href="/person/{e}/revoke" id="revoke-link">Revoke consent and delete this person's data…</a></p>"""
        return _page(f"Person {ref}", body)

    @app.post("/person/{ref}/photos", response_class=HTMLResponse)
    def upload(ref: str, who: Annotated[str, Depends(staff)], csrf: Annotated[str, Form()],
               photos: Annotated[List[UploadFile], File()]) -> HTMLResponse:
        check_token(who, csrf)
        uploads = [(f.filename or "upload", f.file.read(MAX_UPLOAD_BYTES + 1)) for f in photos]
        too_big = [n for n, d in uploads if len(d) > MAX_UPLOAD_BYTES]
        if too_big:
            return error_page("Photos not taken", ValueError(f"{', '.join(too_big)}: larger than "
                                                             f"{MAX_UPLOAD_BYTES // 2**20} MiB"), f"/person/{quote(ref)}")
        try:
            with lock:
                done = enrol_photos(site, ref, uploads, analyzer(), settings.faces, actor=ACTOR_PREFIX + who)
        except MegaPortraitError as exc:
            return error_page("Photos not taken", exc, f"/person/{quote(ref)}")
        rows = "".join(f'<tr class="accepted"><td>{html.escape(n)}</td><td class="ok">accepted</td><td></td></tr>'
                       for n in done.accepted_files)
        rows += "".join(f'<tr class="refused"><td>{html.escape(r.file)}</td><td class="bad">refused: {r.reason}</td>'
                        f"<td>{html.escape(r.detail)}</td></tr>" for r in done.refused)
        rows += "".join(f'<tr><td>{html.escape(n)}</td><td>already enrolled</td><td></td></tr>'
                        for n in done.already_enrolled)
        body = (f'<table id="intake"><tr><th>photo</th><th>result</th><th>why</th></tr>{rows}</table>'
                f'<p><a href="/person/{quote(ref)}">back to {html.escape(ref)}</a></p>')
        return _page(f"Photos of {ref}", body)

    # ------------------------------------------------------------------------------------------------ render

    @app.post("/person/{ref}/render")
    def render(ref: str, who: Annotated[str, Depends(staff)], csrf: Annotated[str, Form()],
               template: Annotated[str, Form()] = "", backend: Annotated[str, Form()] = "classic",
               template_file: Annotated[Optional[UploadFile], File()] = None) -> Response:
        check_token(who, csrf)
        back = f"/person/{quote(ref)}"
        if template_file is not None and template_file.filename:
            name = Path(template_file.filename).name
            data = template_file.file.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES or not name or name.startswith("."):
                return error_page("Not rendered", ValueError("template upload refused (name or size)"), back)
            (templates_dir / name).write_bytes(data)
        elif template and (templates_dir / Path(template).name).is_file():
            name = Path(template).name
            data = (templates_dir / name).read_bytes()
        else:
            return error_page("Not rendered", ValueError("choose a template or upload one"), back)
        if backend not in render_requests.BACKEND_PURPOSE:
            return error_page("Not rendered", ValueError(f"unknown backend {backend!r}"), back)
        try:
            with lock:
                if ref not in site.people():
                    raise render_requests.RenderRefused(f"unknown person {ref!r}")
                check_template(data, name, settings.faces)
                photos = person_photos(site, ref, analyzer(), settings.faces)
                payload, held_out = payload_and_held_out(site, ref, backend, photos)
                rec = render_requests.submit_render(
                    site, conn(), render_requests.RenderRequest(ref, name, data, backend=backend), payload,
                    actor=ACTOR_PREFIX + who)
                state["held_out"][rec.job_id] = held_out
        except MegaPortraitError as exc:
            return error_page("Not rendered", exc, back)
        return RedirectResponse(f"/jobs/{quote(rec.job_id)}", status_code=303)

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs(who: Annotated[str, Depends(staff)]) -> HTMLResponse:
        with lock:
            rows = "".join(f'<tr><td><a href="/jobs/{quote(j.job_id)}">{html.escape(j.job_id)}</a></td>'
                           f"<td>{html.escape(j.person_ref)}</td><td>{j.state}</td><td>{html.escape(j.template)}</td>"
                           f"<td>{j.created_at}</td></tr>" for j in site.jobs.all())
        return _page("Jobs", f'<table id="all-jobs"><tr><th>job</th><th>person</th><th>state</th><th>template</th>'
                             f"<th>created</th></tr>{rows}</table>")

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(job_id: str, who: Annotated[str, Depends(staff)]) -> HTMLResponse:
        try:
            with lock:
                rec = render_requests.refresh(site, conn(), job_id)
                if rec.state == "succeeded":
                    render_requests.fetch_portrait(site, conn(), job_id, analyzer=analyzer(),
                                                   held_out=state["held_out"].get(job_id), actor=ACTOR_PREFIX + who)
                    rec = site.jobs.get(job_id)
                progress = render_requests.progress(conn(), job_id) if not rec.finished else None
        except MegaPortraitError as exc:
            return error_page("Job", exc, "/jobs")
        e = html.escape
        if progress is not None:
            stage, fraction = progress
            body = (f'<p id="job-state">{e(rec.state)} {e(stage)}</p><progress id="progress" max="1" '
                    f'value="{fraction:.3f}"></progress> {fraction * 100:.0f}%<p class="note">This page reloads '
                    "every second while the node renders.</p>")
            return _page(f"Job {job_id}", body, refresh=1)
        body = f'<p id="job-state">{e(rec.state)}</p>'
        if rec.error:
            body += f'<p class="bad">{e(rec.error)}</p>'
        if rec.state == "collected":
            body += _card(rec)
        body += f'<p><a href="/person/{quote(rec.person_ref)}">back to {e(rec.person_ref)}</a></p>'
        return _page(f"Job {job_id}", body)

    @app.get("/gallery", response_class=HTMLResponse)
    def gallery(who: Annotated[str, Depends(staff)]) -> HTMLResponse:
        with lock:
            done = [j for j in site.jobs.all() if j.state == "collected"]
        cards = "".join(_card(j) for j in done) or "<p>No portraits yet.</p>"
        return _page("Gallery", f'<div class="gallery" id="gallery">{cards}</div>')

    @app.get("/portraits/{job_id}.png")
    def portrait(job_id: str, who: Annotated[str, Depends(staff)]) -> Response:
        with lock:
            try:
                rec = site.jobs.get(job_id)
            except MegaPortraitError:
                raise HTTPException(404, "no such portrait") from None
            if rec.state != "collected" or not rec.portrait_item:
                raise HTTPException(404, "no such portrait")
            data = (site.portraits.root / rec.portrait_item).read_bytes()
        return Response(data, media_type="image/png")

    # ------------------------------------------------------------------------------------------------ revoke

    @app.get("/person/{ref}/revoke", response_class=HTMLResponse)
    def confirm_revoke(ref: str, who: Annotated[str, Depends(staff)]) -> HTMLResponse:
        with lock:
            if ref not in site.people():
                raise HTTPException(404, f"unknown person {ref!r}")
            photos, jobs_ = len(site.photos.find_person(ref)), len(site.jobs.all(ref))
        body = f"""<p id="confirm">Revoke every consent of <b>{html.escape(ref)}</b> and delete their data: {photos}
photo(s), their crops, adapters, portraits, staged payloads and {jobs_} job(s) here, and their jobs at the render
node. This cannot be undone.</p>
<form method="post" action="/person/{quote(ref)}/revoke" id="revoke-form">{hidden(who)}
<label><input type="checkbox" name="confirm" value="yes" required> I confirm the person withdrew consent</label>
<button type="submit">Revoke and delete</button></form><p><a href="/person/{quote(ref)}">cancel</a></p>"""
        return _page(f"Revoke {ref}?", body)

    @app.post("/person/{ref}/revoke", response_class=HTMLResponse)
    def do_revoke(ref: str, who: Annotated[str, Depends(staff)], csrf: Annotated[str, Form()],
                  confirm: Annotated[str, Form()] = "") -> HTMLResponse:
        check_token(who, csrf)
        if confirm != "yes":
            return error_page("Not revoked", ValueError("tick the confirmation box"), f"/person/{quote(ref)}/revoke")
        with lock:
            try:
                node = conn()
            except MegaPortraitError:
                node = None  # the node's part is owed; the page says so
            done = revoke(site, ref, node, by="subject")
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in done.lines())
        verdict = ('<p class="ok" id="verdict">Revocation complete: every deletion read back.</p>' if done.complete
                   else f'<p class="bad" id="verdict">Revocation incomplete: {html.escape(", ".join(done.pending))}</p>')
        return _page(f"Revoked {ref}", f'{verdict}<ul id="deleted">{lines}</ul>')

    return app


def _card(rec: Any) -> str:
    """A gallery card: the portrait, its AI-generated label, identity and skin-tone figures."""
    from megaportrait.shared.imaging import AI_GENERATED_LABEL

    f = rec.figures or {}

    def num(key: str, fmt: str) -> str:
        return "-" if f.get(key) is None else format(f[key], fmt)

    tone = {True: "kept", False: "not kept", None: "n/a (person and template alike)"}[f.get("tone_kept")]
    return (f'<div class="card" data-job="{html.escape(rec.job_id)}"><img alt="portrait" '
            f'src="/portraits/{quote(rec.job_id)}.png"><p class="label">{html.escape(AI_GENERATED_LABEL)}</p>'
            f"<p>{html.escape(rec.person_ref)} on {html.escape(rec.template)} ({rec.backend})</p>"
            f"<p>identity {num('identity', '.3f')} (held-out photos) · {num('identity_payload', '.3f')} (payload)</p>"
            f"<p>skin tone ITA: person {num('ita_person', '.1f')}, template {num('ita_template', '.1f')}, portrait "
            f"{num('ita_output', '.1f')}; tone {tone}</p></div>")
