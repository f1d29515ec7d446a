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
