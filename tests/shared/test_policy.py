"""Policy files: the shipped ones load; unknown keys, bad values and broken YAML are refused with file and line."""
from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megaportrait.shared import policy
from megaportrait.shared.cli import app
from megaportrait.shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONSENT = REPO / "policies" / "consent.yaml"
RETENTION = REPO / "policies" / "retention.yaml"


def _edit(tmp_path: Path, src: Path, old: str, new: str) -> Path:
    text = src.read_text()
    assert old in text, f"test fixture out of date: {old!r} not in {src.name}"
    out = tmp_path / src.name
    out.write_text(text.replace(old, new, 1))
    return out


def _line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def test_shipped_policies_load_and_hash_is_file_sha256():
    p = policy.load_policies(CONSENT, RETENTION)
    assert p.consent.version_hash == hashlib.sha256(CONSENT.read_bytes()).hexdigest()
    assert p.retention.version_hash == hashlib.sha256(RETENTION.read_bytes()).hexdigest()
    assert {"federated_training", "personal_adapter", "render", "classic_face_crop_payload"} <= set(p.consent.purposes)
    assert set(policy.DATA_KINDS) == {"source_photos", "face_crops", "personal_adapters", "render_payloads", "outputs", "audit_log"}
    for kind in policy.DATA_KINDS:
        assert p.retention.keep(kind) > timedelta(0)
    assert p.consent.purpose("classic_face_crop_payload").requires == ("render",)


def test_unknown_key_in_consent_policy_names_file_and_line(tmp_path):
    bad = _edit(tmp_path, CONSENT, "    max_validity: 90d\n", "    max_validity: 90d\n    share_with_partners: true\n")
    with pytest.raises(policy.PolicyError) as info:
        policy.load_consent_policy(bad)
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.path == bad and err.line == _line_of(bad, "share_with_partners")
    assert str(err).startswith(f"{bad}:{err.line}: ") and "share_with_partners" in str(err) and "unknown key" in str(err)


def test_unknown_data_kind_in_retention_policy_names_line(tmp_path):
    bad = _edit(tmp_path, RETENTION, "  outputs:", "  selfies:\n    keep: 3d\n  outputs:")
    with pytest.raises(policy.PolicyError) as info:
        policy.load_retention_policy(bad)
    assert info.value.line == _line_of(bad, "selfies:")
    assert "kinds.selfies" in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "needle", "says"),
    [
        ("    keep: 7d", "    keep: seven days", "seven days", "not a duration"),
        ("    keep: 7d", "    keep: 0d", "keep: 0d", "longer than zero"),
        ("  on_startup: true", "  on_startup: sometimes", "sometimes", "bool"),
        ("version: 1", "version: 2", "version: 2", "1"),
    ],
)
def test_bad_retention_value_names_line(tmp_path, old, new, needle, says):
    bad = _edit(tmp_path, RETENTION, old, new)
    with pytest.raises(policy.PolicyError) as info:
        policy.load_retention_policy(bad)
    assert info.value.path == bad
    assert info.value.line == _line_of(bad, needle)
    assert says in str(info.value)


def test_bad_grantor_role_and_unknown_required_purpose(tmp_path):
    bad = _edit(tmp_path, CONSENT, "granted_by: [subject, guardian, legal_representative]\n    max_validity: 90d\n    requires",
                "granted_by: [subject, neighbour]\n    max_validity: 90d\n    requires")
    with pytest.raises(policy.PolicyError) as info:
        policy.load_consent_policy(bad)
    assert info.value.line == _line_of(bad, "neighbour") and "neighbour" not in info.value.detail.split(":")[0]
    assert "granted_by.1" in str(info.value)

    bad2 = _edit(tmp_path, CONSENT, "requires: [render]", "requires: [rendering]")
    with pytest.raises(policy.PolicyError) as info:
        policy.load_consent_policy(bad2)
    assert "purposes.classic_face_crop_payload.requires.0: requires unknown purpose 'rendering'" in str(info.value)
    assert info.value.line == _line_of(bad2, "rendering")


def test_missing_key_duplicate_key_and_yaml_syntax(tmp_path):
    missing = _edit(tmp_path, RETENTION, "  audit_log:            # minimum: audit entries are never swept before this; the chain is never edited\n    keep: 6y\n    delete_on_revocation: false\n", "")
    with pytest.raises(policy.PolicyError) as info:
        policy.load_retention_policy(missing)
    assert "kinds.audit_log: required key is missing" in str(info.value)
    assert info.value.line == _line_of(missing, "kinds:") + 1  # the value of `kinds:` starts on the next line

    dup = tmp_path / "dup.yaml"
    dup.write_text(RETENTION.read_text().replace("sweep:\n", "sweep:\n  interval: 2h\n", 1))
    with pytest.raises(policy.PolicyError) as info:
        policy.load_retention_policy(dup)
    assert "duplicate key 'interval'" in str(info.value) and info.value.line == _line_of(dup, "interval: 1h")

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nkinds:\n  outputs: {keep: 7d\n")
    with pytest.raises(policy.PolicyError) as info:
        policy.load_retention_policy(broken)
    assert "not valid YAML" in str(info.value) and info.value.line is not None

    with pytest.raises(policy.PolicyError, match="does not exist"):
        policy.load_consent_policy(tmp_path / "nope.yaml")


def test_cli_check_policies_reports_file_and_line(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "check-policies", "--consent", str(CONSENT), "--retention", str(RETENTION)])
    assert ok.exit_code == 0, ok.output
    assert hashlib.sha256(CONSENT.read_bytes()).hexdigest() in ok.output
    bad = _edit(tmp_path, RETENTION, "    keep: 1d", "    keep: 1 fortnight")
    res = runner.invoke(app, ["audit", "check-policies", "--consent", str(CONSENT), "--retention", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:{_line_of(bad, 'fortnight')}:" in res.output
