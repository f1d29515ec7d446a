"""The reviewers' page: authenticated, read-only, filters server-side, and shows the verifier's verdict."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from megaportrait.server.audit_review import ReviewedLog, check_password, create_review_app, hash_password
from megaportrait.shared import audit

PASSWORD = "correct horse battery staple"


def build_logs(tmp_path: Path) -> list[ReviewedLog]:
    """A site log and a render-node log, each with its own key, about two persons."""
    logs = []
    for component, actions in (
        ("site:alpha", [("consent.grant", "p-obama", "ok"), ("consent.check", "p-biden", "refused"),
                        ("consent.grant", "p-biden", "ok"), ("consent.revoke", "p-obama", "ok")]),
        ("render-node:n1", [("job.render", "p-obama", "ok"), ("job.render", "p-biden", "ok"),
                            ("revocation.render_delete", "p-obama", "ok")]),
    ):  # fmt: skip
        name = component.replace(":", "-")
        key = audit.generate_signing_key(tmp_path / f"{name}.key")
        log = audit.AuditLog(tmp_path / f"{name}.jsonl", key, component=component, checkpoint_every=0)
        for action, person, outcome in actions:
            log.append(action, actor="operator:1", person=person, outcome=outcome, data=["ab" * 32], policy="cd" * 32,
                       detail={"note": "<script>alert(1)</script>"})  # fmt: skip
        log.checkpoint()
        logs.append(ReviewedLog(log.path, key.public_key()))
    return logs


@pytest.fixture(scope="module")
def reviewer_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture()
def client(tmp_path, reviewer_hash):
    logs = build_logs(tmp_path)
    app = create_review_app(logs, {"rita": reviewer_hash})
    with TestClient(app) as c:
        c.logs = logs  # type: ignore[attr-defined]
        yield c


AUTH = ("rita", PASSWORD)


def test_password_hash_round_trip(reviewer_hash):
    assert reviewer_hash.startswith("scrypt$") and PASSWORD not in reviewer_hash
    assert check_password(PASSWORD, reviewer_hash)
    assert not check_password(PASSWORD + "!", reviewer_hash)
    assert not check_password(PASSWORD, "scrypt$garbage")
    with pytest.raises(ValueError, match="hash-password"):
        create_review_app([], {"rita": PASSWORD})


def test_requires_a_reviewer(client):
    assert client.get("/").status_code == 401
    assert client.get("/", auth=("rita", "wrong")).status_code == 401
    assert client.get("/", auth=("mallory", PASSWORD)).status_code == 401
    assert client.get("/export.json").status_code == 401
    r = client.get("/", auth=AUTH)
    assert r.status_code == 200 and 'id="reviewer">rita<' in r.text
    assert r.headers["cache-control"] == "no-store" and "default-src 'none'" in r.headers["content-security-policy"]


def test_no_write_endpoints(client):
    methods = {m for route in client.app.routes for m in getattr(route, "methods", set())}
    assert methods <= {"GET", "HEAD"}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert client.request(method, "/", auth=AUTH).status_code == 405
    assert client.get("/docs", auth=AUTH).status_code == 404 and client.get("/openapi.json", auth=AUTH).status_code == 404


def test_page_filters_and_escapes(client):
    page = client.get("/", auth=AUTH).text
    assert "7 matching entries" in page and page.count('data-log-ok="1"') == 2
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    only = client.get("/", params={"person": "p-obama"}, auth=AUTH).text
    assert "4 matching entries" in only and only.count('data-person="p-obama"') == 4 and 'data-person="p-biden"' not in only
    refused = client.get("/", params={"site": "alpha", "outcome": "refused"}, auth=AUTH).text
    assert "1 matching entries" in refused and 'data-action="consent.check"' in refused
    assert client.get("/", params={"action": "revocation"}, auth=AUTH).text.count('class="entry ') == 1
    assert client.get("/", params={"since": "2999-01-01T00:00"}, auth=AUTH).text.count('class="entry ') == 0
    bad = client.get("/", params={"since": "yesterday"}, auth=AUTH)
    assert bad.status_code == 400 and "ISO" in bad.text
    assert client.get("/", params={"outcome": "maybe"}, auth=AUTH).status_code == 400


def test_exports_take_the_same_filter(client):
    js = client.get("/export.json", params={"person": "p-biden"}, auth=AUTH).json()
    assert [e["action"] for e in js] == ["consent.check", "consent.grant", "job.render"]
    assert all(set(e) >= {"hash", "sig", "prev", "policy"} for e in js)
    rows = list(csv.DictReader(io.StringIO(client.get("/export.csv", params={"site": "render-node"}, auth=AUTH).text)))
    assert [r["component"] for r in rows] == ["render-node:n1"] * 3


def test_page_shows_a_tampered_log(client):
    path = client.logs[1].path
    lines = path.read_text().splitlines()
    obj = json.loads(lines[1])
    obj["person"] = "p-someone-else"
    lines[1] = json.dumps(obj)
    path.write_text("\n".join(lines) + "\n")
    page = client.get("/", auth=AUTH).text
    assert 'data-log-ok="0"' in page and "line 2 (seq 1): edited" in page


def test_healthz_and_metrics_need_no_login_and_show_no_entry(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {
        "service": "audit-review", "status": "ok",
        "checks": [{"name": "log:site-alpha.jsonl", "ok": True, "detail": ""}, {"name": "log:render-node-n1.jsonl", "ok": True, "detail": ""}],
    }  # fmt: skip
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'megaportrait_build_info{service="audit-review"' in text
    assert f'megaportrait_audit_log_size_bytes{{log="site-alpha.jsonl"}} {float(client.logs[0].path.stat().st_size)}' in text
    assert "megaportrait_audit_log_verified{" not in text  # a scrape never verifies; nothing was verified yet
    assert "p-obama" not in text and "consent.grant" not in text and "p-obama" not in r.text
    client.get("/", auth=AUTH)  # the page verifies both logs
    assert 'megaportrait_audit_log_verified{log="render-node-n1.jsonl"} 1.0' in client.get("/metrics").text
    # a log that went missing makes the service unhealthy, and says which
    client.logs[1].path.rename(client.logs[1].path.with_suffix(".moved"))
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "failing"
    assert [c["name"] for c in r.json()["checks"] if not c["ok"]] == ["log:render-node-n1.jsonl"]
    assert 'megaportrait_health_check_ok{check="log:render-node-n1.jsonl"} 0.0' in client.get("/metrics").text


# ---------------------------------------------------------------------------------------------- hostile input (issue 18)


def _headers_ok(r) -> bool:
    return (r.headers.get("x-content-type-options") == "nosniff" and r.headers.get("cache-control") == "no-store"
            and "default-src 'none'" in r.headers.get("content-security-policy", "") and r.headers.get("x-frame-options") == "DENY")


def test_an_unparsable_line_fails_its_log_and_the_others_are_still_shown(tmp_path, reviewer_hash):
    logs = build_logs(tmp_path)
    lines = logs[0].path.read_text().splitlines()
    lines.insert(2, "{not json")
    logs[0].path.write_text("\n".join(lines) + "\n")
    with TestClient(create_review_app(logs, {"rita": reviewer_hash}), raise_server_exceptions=False) as c:
        r = c.get("/", auth=AUTH)
        assert r.status_code == 200 and _headers_ok(r), r.text[:300]
        assert 'data-log-ok="0"' in r.text and "site-alpha.jsonl: 1 problem(s)" in r.text
        assert "line 3: unreadable: not an audit entry" in r.text  # as `megaportrait audit verify` says it
        assert 'data-log-ok="1">render-node-n1.jsonl: verified' in r.text
        assert "7 matching entries" in r.text and 'id="skipped"' in r.text and "site-alpha.jsonl:3: not an audit entry" in r.text
        js = c.get("/export.json", auth=AUTH)
        assert js.status_code == 200 and len(js.json()) == 7 and js.headers["x-audit-skipped"].startswith("site-alpha.jsonl:3:")
        csv_ = c.get("/export.csv", params={"site": "render-node"}, auth=AUTH)
        assert csv_.status_code == 200 and len(list(csv.DictReader(io.StringIO(csv_.text)))) == 3
        logs[1].path.unlink()  # a log that went missing fails too, and the page still answers
        r = c.get("/", auth=AUTH)
        assert r.status_code == 200 and "render-node-n1.jsonl: 1 problem(s)" in r.text and "does not exist" in r.text


def test_every_response_carries_the_security_headers_even_an_internal_error(client, monkeypatch):
    responses = [client.get("/"), client.get("/", auth=("rita", "wrong")), client.get("/", params={"outcome": "x"}, auth=AUTH),
                 client.get("/nowhere", auth=AUTH), client.post("/", auth=AUTH), client.get("/healthz")]  # fmt: skip
    assert [r.status_code for r in responses] == [401, 401, 400, 404, 405, 200]
    assert all(_headers_ok(r) for r in responses), [dict(r.headers) for r in responses]

    def broken(*a, **kw):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(audit, "filter_entries", broken)
    with TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.get("/", auth=AUTH)
    assert r.status_code == 500 and _headers_ok(r) and "simulated bug" not in r.text


def test_long_bad_query_values_are_not_echoed(client):
    for params in ({"since": "9" * 5000}, {"until": "yesterday-" + "x" * 5000}, {"person": "p" * 5000}, {"action": "<" * 300}):
        r = client.get("/", params=params, auth=AUTH)
        assert r.status_code == 400 and _headers_ok(r), r.text[:200]
        assert len(r.text) < 300, r.text[:400]
    r = client.get("/", params={"since": "tomorrow"}, auth=AUTH)
    assert r.status_code == 400 and "'tomorrow' is not an ISO date/time" in r.text  # a short value is still quoted


def test_a_log_without_checkpoint_says_so_not_size_none(tmp_path, reviewer_hash):
    key = audit.generate_signing_key(tmp_path / "fresh.key")
    log = audit.AuditLog(tmp_path / "fresh.jsonl", key, component="site:fresh", checkpoint_every=0)
    log.append("consent.grant", actor="operator:1", person="p-1")
    with TestClient(create_review_app([ReviewedLog(log.path, key.public_key())], {"rita": reviewer_hash})) as c:
        page = c.get("/", auth=AUTH).text
    assert "fresh.jsonl: verified, 1 entries, no checkpoint yet" in page and "None" not in page


def test_failed_logins_are_throttled_per_client_over_a_real_server(tmp_path, reviewer_hash):
    """A guesser on 127.0.0.2 sending wrong passwords as fast as it can is refused (429, Retry-After) without its
    passwords being hashed, while the reviewer on 127.0.0.1 keeps getting pages promptly."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    app = create_review_app(build_logs(tmp_path), {"rita": reviewer_hash})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline, "review server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        guesser = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
        reviewer = httpx.Client(timeout=30)
        started = time.monotonic()
        codes = [guesser.get(url, auth=("rita", f"guess-{i}")).status_code for i in range(400)]
        guessing_s = time.monotonic() - started
        assert codes[:5] == [401] * 5 and codes.count(429) >= 390, codes[:20]
        throttled = guesser.get(url, auth=AUTH)  # even the right password waits its turn from that address
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1 and _headers_ok(throttled)
        assert guessing_s < 8  # refused tries are not hashed (400 scrypt checks alone take ~25 s here)
        times = []
        for _ in range(3):
            t0 = time.monotonic()
            assert reviewer.get(url, auth=AUTH).status_code == 200
            times.append(time.monotonic() - t0)
        print(f"400 guesses in {guessing_s:.2f} s; reviewer pages {[round(t, 3) for t in times]} s")
        assert max(times) < 2.0, times
        guesser.close()
        reviewer.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_revocation_shows_every_site_store_it_emptied(tmp_path, reviewer_hash, people):
    from megaportrait.shared import consent
    from megaportrait.shared.policy import load_consent_policy
    from megaportrait.shared.retention import FileStore

    repo = Path(__file__).resolve().parents[2]
    key = audit.generate_signing_key(tmp_path / "site.key")
    log = audit.AuditLog(tmp_path / "site-alpha.jsonl", key, component="site:alpha", checkpoint_every=0)
    ledger = consent.ConsentLedger(tmp_path / "consent.sqlite", site="alpha", key=key,
                                   policy=load_consent_policy(repo / "policies" / "consent.yaml"), audit=log)
    try:
        ledger.grant("p-obama", ["render"], granted_by="subject", actor="operator:1")
        stores = [FileStore(tmp_path / name, name) for name in ("source_photos", "face_crops", "personal_adapters")]
        for i, photo in enumerate(people["obama"][:2]):
            stores[0].put("p-obama", f"{i}.jpg", photo.read_bytes())
        stores[1].put("p-obama", "0.png", b"crop")  # personal_adapters stays empty: audited all the same
        consent.revoke_person("p-obama", ledger=ledger, by="subject", site_stores=stores)
        log.checkpoint()
    finally:
        ledger.close()
    app = create_review_app([ReviewedLog(log.path, key.public_key())], {"rita": reviewer_hash})
    with TestClient(app) as client:
        page = client.get("/", params={"person": "p-obama", "action": "revocation"}, auth=AUTH).text
    assert page.count('data-action="revocation.site_delete"') == 3, page
    for store in ("source_photos", "face_crops", "personal_adapters"):
        assert f"&quot;store&quot;: &quot;{store}&quot;" in page, store
    assert page.count('class="entry o-ok"') == 3  # each read back empty
