"""`megaportrait pki`: the per-machine folders, key modes, chains, refusals, and keys Flower and gRPC accept."""
from __future__ import annotations

import json
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from megaportrait.shared.cli import app
from megaportrait.shared.pki import Credential

runner = CliRunner()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki") / "pki"
    res = runner.invoke(app, ["pki", "init", "--out", str(out), "--sites", "alpha,beta", "--coordinator-names", "fl.example.org,10.1.2.3"])
    assert res.exit_code == 0, res.output
    return out


def test_layout_one_folder_per_machine_with_private_keys_0600(pki):
    expected = {
        "ca": {"ca.pem", "ca.key"},
        "coordinator": {"ca.pem", "superlink.pem", "superlink.key", "sites"},
        "coordinator/sites": {"alpha.pub", "beta.pub"},
        "render-node": {"ca.pem", "render-node.pem", "render-node.key"},
        "sites/alpha": {"ca.pem", "alpha.pem", "alpha.key", "node-auth.key", "node-auth.pub"},
    }
    for folder, names in expected.items():
        assert {p.name for p in (pki / folder).iterdir()} == names, folder
    for key in pki.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    inventory = json.loads((pki / "inventory.json").read_text())
    assert [i["subject"] for i in inventory["issued"]] == ["MegaPortrait CA", "superlink", "render-node", "alpha", "beta"]
    assert "BEGIN" not in (pki / "inventory.json").read_text()


def test_certificates_chain_to_the_ca_with_the_right_roles_and_names(pki):
    ca = Credential.load(pki / "ca", "ca").certificate
    link = Credential.load(pki / "coordinator", "superlink").certificate
    link.verify_directly_issued_by(ca)
    san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"10.1.2.3", "127.0.0.1"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in link.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    alpha = Credential.load(pki / "sites" / "alpha", "alpha")
    assert alpha.common_name == "alpha"
    alpha.certificate.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in alpha.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_node_auth_keys_load_with_flowers_own_loaders(pki):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    key = load_ssh_private_key((pki / "sites" / "beta" / "node-auth.key").read_bytes(), None)
    assert key.curve.name == "secp384r1"
    assert try_load_public_key(pki / "coordinator" / "sites" / "beta.pub")
    assert (pki / "coordinator" / "sites" / "beta.pub").read_bytes() == (pki / "sites" / "beta" / "node-auth.pub").read_bytes()


def test_show_reports_ok_and_flags_a_foreign_certificate(pki, tmp_path):
    res = runner.invoke(app, ["pki", "show", str(pki)])
    assert res.exit_code == 0 and res.output.count("ok ") == 5, res.output
    other = tmp_path / "other"
    assert runner.invoke(app, ["pki", "init", "--out", str(other)]).exit_code == 0
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(pki, copy)
    shutil.copy(other / "render-node" / "render-node.pem", copy / "render-node" / "render-node.pem")
    res = runner.invoke(app, ["pki", "show", str(copy)])
    assert res.exit_code == 1 and "foreign" in res.output


def test_init_refuses_to_replace_a_ca_and_add_site_extends_it(pki):
    before = (pki / "ca" / "ca.pem").read_bytes()
    res = runner.invoke(app, ["pki", "init", "--out", str(pki), "--sites", "gamma"])
    assert res.exit_code == 2 and "orphan" in res.output
    assert (pki / "ca" / "ca.pem").read_bytes() == before
    res = runner.invoke(app, ["pki", "add-site", "--out", str(pki), "--site", "gamma"])
    assert res.exit_code == 0, res.output
    Credential.load(pki / "sites" / "gamma", "gamma").certificate.verify_directly_issued_by(Credential.load(pki / "ca", "ca").certificate)
    assert runner.invoke(app, ["pki", "add-site", "--out", str(pki), "--site", "gamma"]).exit_code == 2  # never overwrite


@pytest.mark.parametrize("sites", ["Alpha", "a_b", "-x", "a,a"])
def test_bad_site_ids_are_refused_before_anything_is_written(tmp_path, sites):
    res = runner.invoke(app, ["pki", "init", "--out", str(tmp_path / "p"), "--sites", sites])
    assert res.exit_code == 2 and "site id" in res.output
    assert not (tmp_path / "p").exists()
