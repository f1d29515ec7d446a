"""The reviewers' audit page: a read-only FastAPI app over one or more audit logs.

Reviewers authenticate with HTTP Basic against scrypt hashes from the config (`policy.reviewers`, made with
`megaportrait audit hash-password`); there is no other role and no endpoint that writes. The page shows each log's
verification result (the same `audit.verify` the CLI runs) and the entries that match a filter given in the query
string (person, site, action, outcome, since, until), rendered server-side; JSON and CSV exports take the same
filter. `/healthz` and `/metrics` need no login and show no entry: only whether each log file is readable, its size,
and the result of the last verification the page ran.

Hostile input: a log that cannot be verified or read shows as failing (line and reason as the CLI gives them) while
the others are still shown; every response, errors included, carries the security headers; failed logins are
throttled per client address (a throttled try is refused before its password is hashed); a bad query value is
never echoed beyond `_ECHO_CHARS` characters.
"""
# No `from __future__ import annotations`: FastAPI resolves the routes' dependency annotations at runtime.

import csv
import hashlib
import hmac
import html
import io
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Mapping, Sequence
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from megaportrait.shared import audit, service_health

log = logging.getLogger("megaportrait.audit_review")

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
MAX_ROWS = 2000
"""The page shows at most this many matching entries (newest first); exports have no limit."""
MAX_FILTER_CHARS = 200
"""A filter value longer than this is refused (a person_ref, site or action is far shorter)."""
_ECHO_CHARS = 40
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A reviewer credential hash for the config: 'scrypt$n$r$p$salt_hex$hash_hex'."""
    if not password:
        raise ValueError("empty password")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def check_password(password: str, hashed: str) -> bool:
    """Constant-time check of a password against `hash_password` output; False for any malformed hash."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = hashed.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p), dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


@dataclass(frozen=True)
class ReviewedLog:
    """One component's audit log and the public key its entries must verify with."""

    path: Path
    public_key: Ed25519PublicKey


class _VerifyCache:
    """Re-verify a log only when its files changed (size and mtime of the log and its checkpoints)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple, audit.VerifyReport]] = {}

    def get(self, log: ReviewedLog) -> audit.VerifyReport:
        stamp = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) if os.path.exists(p) else None
                      for p in (log.path, f"{log.path}.checkpoints"))  # fmt: skip
        with self._lock:
            hit = self._cache.get(log.path)
            if hit and hit[0] == stamp:
                return hit[1]
        try:
            report = audit.verify(log.path, log.public_key)
        except (audit.AuditError, OSError) as exc:  # missing or unreadable file: the log fails, the page goes on
            report = audit.VerifyReport(path=log.path, entries=0, checkpoints=0, last_checkpoint_size=None, head=audit.GENESIS,
                                        problems=(audit.Problem("unreadable", None, None, str(exc)),))  # fmt: skip
        with self._lock:
            self._cache[log.path] = (stamp, report)
        return report

    def last(self, log: ReviewedLog) -> audit.VerifyReport | None:
        """The latest report computed for `log` (possibly older than the file), or None; never verifies."""
        with self._lock:
            hit = self._cache.get(log.path)
        return hit[1] if hit else None


def _clip(value: str) -> str:
    """A bad value as an error message may quote it: its first `_ECHO_CHARS` characters and its length."""
    return repr(value) if len(value) <= _ECHO_CHARS else f"{value[:_ECHO_CHARS]!r}... ({len(value)} characters)"


def _parse_time(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{name}: {_clip(value)} is not an ISO date/time (e.g. 2026-11-25T08:00)") from None


class LoginThrottle:
    """Failed logins per client address: after `free` failures each further try waits `base_s`, doubling per failure
    up to `max_wait_s`; a success, or `forget_s` without a failure, clears the client. At most `max_clients` are
    remembered (the oldest is dropped). Behind a reverse proxy every client shares its address: throttle there too."""

    def __init__(self, *, free: int = 5, base_s: float = 1.0, max_wait_s: float = 60.0, forget_s: float = 900.0,
                 max_clients: int = 10_000, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
        self.free, self.base_s, self.max_wait_s, self.forget_s, self.max_clients = free, base_s, max_wait_s, forget_s, max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait_s(self, client: str) -> float:
        """Seconds this client must wait before its next try (0 when it may try now)."""
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
            elapsed = self._clock() - last
            if count and elapsed > self.forget_s:
                del self._failures[client]
                return 0.0
            if count < self.free:
                return 0.0
            return max(0.0, min(self.base_s * 2 ** (count - self.free), self.max_wait_s) - elapsed)

    def failed(self, client: str) -> None:
        with self._lock:
            count, _ = self._failures.pop(client, (0, 0.0))
            self._failures[client] = (count + 1, self._clock())
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


_PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ccc;padding:.2rem .4rem;vertical-align:top}
th{background:#f3f3f3}.ok{color:#0a6b2b}.bad{color:#a40000}tr.o-refused{background:#fff4e0}tr.o-failed{background:#fde8e8}
form label{margin-right:.8rem}code{font-size:.8rem}
"""


def create_review_app(logs: Sequence[ReviewedLog], reviewers: Mapping[str, str], *, throttle: LoginThrottle | None = None) -> FastAPI:
    """The reviewer app over `logs`; `reviewers` maps reviewer name -> `hash_password` hash. Only GET routes."""
    if not reviewers:
        raise ValueError("no reviewers configured: add `policy.reviewers` (name: hash from `megaportrait audit hash-password`)")
    for name, hashed in reviewers.items():
        if not hashed.startswith("scrypt$"):
            raise ValueError(f"reviewer {name!r}: credential must be a hash from `megaportrait audit hash-password`, not a password")
    app = FastAPI(title="MegaPortrait audit review", docs_url=None, redoc_url=None, openapi_url=None)
    basic = HTTPBasic(realm="megaportrait-audit")
    cache = _VerifyCache()
    paths = [log.path for log in logs]
    throttle = throttle or LoginThrottle()

    def reviewer(request: Request, creds: Annotated[HTTPBasicCredentials, Depends(basic)]) -> str:
        client = request.client.host if request.client else "unknown"
        wait = throttle.wait_s(client)
        if wait > 0:  # refused before hashing: a guesser cannot spend the page's CPU
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"too many failed logins from this address; retry in {math.ceil(wait)} s",
                                headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
        hashed = reviewers.get(creds.username)
        # Hash even for unknown names so a wrong name and a wrong password take the same time.
        ok = check_password(creds.password, hashed or next(iter(reviewers.values())))
        if not (hashed and ok):
            throttle.failed(client)
            log.warning("failed reviewer login from %s", client)
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown reviewer or wrong password",
                                headers={"WWW-Authenticate": 'Basic realm="megaportrait-audit"'})  # fmt: skip
        throttle.succeeded(client)
        return creds.username

    def entry_filter(
        person: str = "", site: str = "", action: str = "", outcome: str = "",
        since: Annotated[str | None, Query()] = None, until: Annotated[str | None, Query()] = None,
    ) -> audit.EntryFilter:  # fmt: skip
        for name, value in (("person", person), ("site", site), ("action", action), ("since", since or ""), ("until", until or "")):
            if len(value) > MAX_FILTER_CHARS:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{name}: {len(value)} characters, at most {MAX_FILTER_CHARS}")
        if outcome and outcome not in audit.OUTCOMES:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"outcome must be one of {', '.join(audit.OUTCOMES)}")
        return audit.EntryFilter(person=person.strip(), site=site.strip(), action=action.strip(), outcome=outcome,
                                 since=_parse_time("since", since), until=_parse_time("until", until))  # fmt: skip

    @app.middleware("http")
    async def headers(request, call_next):  # type: ignore[no-untyped-def]
        try:
            response = await call_next(request)
        except Exception:  # an unexpected failure still answers with the headers, and without its traceback
            log.exception("audit review: %s %s failed", request.method, request.url.path)
            response = JSONResponse({"detail": "internal error; see the server log"}, status_code=500)
        response.headers.update(SECURITY_HEADERS)
        return response

    health_registry = service_health.new_registry("audit-review")
    check_gauge = Gauge("megaportrait_health_check_ok", "1 when the named health check passed at the last probe or scrape.",
                        ["check"], registry=health_registry)  # fmt: skip
    size_gauge = Gauge("megaportrait_audit_log_size_bytes", "Size of each reviewed audit log.", ["log"], registry=health_registry)
    verified_gauge = Gauge("megaportrait_audit_log_verified", "1 when the log had no problem at the last verification the page ran "
                           "(absent until one ran).", ["log"], registry=health_registry)  # fmt: skip

    def readable(path: Path):  # type: ignore[no-untyped-def]
        def check() -> None:
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            if not os.access(path, os.R_OK):
                raise PermissionError(f"{path} is not readable")

        return check

    checks = {f"log:{log.path.name}": readable(log.path) for log in logs}

    def run_checks() -> list:  # type: ignore[type-arg]
        results = service_health.run_checks(checks)
        for r in results:
            check_gauge.labels(r.name).set(1 if r.ok else 0)
        return results

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        """Unauthenticated liveness: every reviewed log file is readable. Shows no entry and no verification result."""
        results = run_checks()
        ok = all(r.ok for r in results)
        body = {"service": "audit-review", "status": "ok" if ok else "failing", "checks": [r.__dict__ for r in results]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Unauthenticated Prometheus metrics: per log, its size and last verification result; process metrics.

        A scrape never verifies (that is the page's work, cached): it reads what the last verification found.
        """
        run_checks()
        for log in logs:
            if log.path.is_file():
                size_gauge.labels(log.path.name).set(log.path.stat().st_size)
            report = cache.last(log)
            if report is not None:
                verified_gauge.labels(log.path.name).set(1 if report.ok else 0)
        return Response(generate_latest(health_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page(who: Annotated[str, Depends(reviewer)], flt: Annotated[audit.EntryFilter, Depends(entry_filter)]) -> HTMLResponse:
        reports = [cache.get(log) for log in logs]
        skipped: list[str] = []
        entries = audit.filter_entries(paths, flt, skipped=skipped)
        return HTMLResponse(_render_page(who, reports, entries, flt, skipped))

    def skipped_header(skipped: list[str]) -> dict[str, str]:
        """Exports say which lines they left out (ASCII, one header): a damaged log does not pass unnoticed."""
        if not skipped:
            return {}
        text = "; ".join(skipped[:20]) + (f"; and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        return {"X-Audit-Skipped": text.encode("ascii", "replace").decode()[:2000]}

    @app.get("/export.json")
    def export_json(who: Annotated[str, Depends(reviewer)], flt: Annotated[audit.EntryFilter, Depends(entry_filter)]) -> JSONResponse:
        skipped: list[str] = []
        entries = audit.filter_entries(paths, flt, skipped=skipped)
        return JSONResponse([e.to_json() for e in entries], headers=skipped_header(skipped))

    @app.get("/export.csv")
    def export_csv(who: Annotated[str, Depends(reviewer)], flt: Annotated[audit.EntryFilter, Depends(entry_filter)]) -> Response:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=audit.CSV_COLUMNS)
        writer.writeheader()
        skipped: list[str] = []
        for e in audit.filter_entries(paths, flt, skipped=skipped):
            writer.writerow(audit.entry_row(e))
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="audit.csv"', **skipped_header(skipped)})  # fmt: skip

    return app


def _render_page(who: str, reports: Sequence[audit.VerifyReport], entries: Sequence[audit.AuditEntry], flt: audit.EntryFilter,
                 skipped: Sequence[str] = ()) -> str:  # fmt: skip
    e = html.escape
    status_rows = []
    for r in reports:
        if r.ok:
            cp = "no checkpoint yet" if r.last_checkpoint_size is None else f"last checkpoint at size {r.last_checkpoint_size}"
            status_rows.append(f'<li class="ok" data-log-ok="1">{e(r.path.name)}: verified, {r.entries} entries, {cp}</li>')
        else:
            problems = "".join(f"<li>{e(str(p))}</li>" for p in r.problems[:50])
            status_rows.append(f'<li class="bad" data-log-ok="0">{e(r.path.name)}: {len(r.problems)} problem(s)<ul>{problems}</ul></li>')
    values = {"person": flt.person, "site": flt.site, "action": flt.action, "outcome": flt.outcome,
              "since": flt.since.isoformat() if flt.since else "", "until": flt.until.isoformat() if flt.until else ""}  # fmt: skip
    fields = "".join(f'<label>{k} <input name="{k}" value="{e(v)}" size="14"></label>' for k, v in values.items() if k != "outcome")
    options = "".join(f'<option value="{o}"{" selected" if o == flt.outcome else ""}>{o or "any"}</option>' for o in ("", *audit.OUTCOMES))
    fields += f'<label>outcome <select name="outcome">{options}</select></label>'
    query = urlencode({k: v for k, v in values.items() if v})
    shown = list(reversed(entries))[:MAX_ROWS]
    rows = "".join(
        f'<tr class="entry o-{e(x.outcome)}" data-person="{e(x.person)}" data-action="{e(x.action)}">'
        f"<td>{e(x.ts)}</td><td>{e(x.component)}</td><td>{x.seq}</td><td>{e(x.actor)}</td><td>{e(x.action)}</td>"
        f"<td><code>{e(x.person)}</code></td><td>{e(x.outcome)}</td><td><code>{e(x.policy[:12])}</code></td>"
        f"<td><code>{e(' '.join(d[:12] for d in x.data))}</code></td>"
        f"<td><code>{e(json.dumps(x.detail, sort_keys=True))}</code></td></tr>"
        for x in shown
    )
    more = f"<p>Showing the newest {MAX_ROWS}; export for all.</p>" if len(entries) > MAX_ROWS else ""
    if skipped:
        items = "".join(f"<li>{e(x)}</li>" for x in skipped[:50])
        more += f'<div class="bad" id="skipped"><p>{len(skipped)} line(s) are not entries and are left out:</p><ul>{items}</ul></div>'
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>MegaPortrait audit review</title>
<style>{_PAGE_CSS}</style></head><body>
<h1>Audit review</h1><p>Signed in as <b id="reviewer">{e(who)}</b> (read-only).</p>
<h2>Log verification</h2><ul id="verification">{''.join(status_rows)}</ul>
<h2>Entries</h2><form method="get" action="/">{fields}<button type="submit">Filter</button> <a href="/">clear</a></form>
<p id="count">{len(entries)} matching entries</p>{more}
<p>Export: <a href="/export.json?{e(query)}">JSON</a> · <a href="/export.csv?{e(query)}">CSV</a></p>
<table id="entries"><thead><tr><th>time (UTC)</th><th>component</th><th>seq</th><th>actor</th><th>action</th><th>person</th>
<th>outcome</th><th>policy</th><th>data</th><th>detail</th></tr></thead><tbody>{rows}</tbody></table>
</body></html>"""
