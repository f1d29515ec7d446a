"""The private PKI: a CA that issues server and client certificates which chain to it (checked by a verifier)."""
from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from megaportrait.shared import pki


@pytest.fixture(scope="module")
def ca() -> pki.Credential:
    return pki.create_ca("Test CA")


def test_server_certificate_verifies_for_its_names(ca):
    server = pki.issue_certificate(ca, "render-node", role="server", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    verifier = PolicyBuilder().store(Store([ca.certificate])).build_server_verifier(x509.DNSName("localhost"))
    chain = verifier.verify(server.certificate, [])
    assert chain[-1] == ca.certificate
    eku = server.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH not in eku
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca.certificate])).build_server_verifier(x509.DNSName("elsewhere.example")).verify(server.certificate, [])


def test_client_certificate_chains_to_ca_only(ca):
    client = pki.issue_certificate(ca, "site-a", role="client")
    assert client.common_name == "site-a"
    verified = PolicyBuilder().store(Store([ca.certificate])).build_client_verifier().verify(client.certificate, [])
    assert verified.chain[-1] == ca.certificate
    other_ca = pki.create_ca("Other CA")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other_ca.certificate])).build_client_verifier().verify(client.certificate, [])


def test_server_certificate_needs_a_name(ca):
    with pytest.raises(ValueError, match="DNS name or IP"):
        pki.issue_certificate(ca, "render-node", role="server")


def test_init_pki_writes_private_keys_and_refuses_to_replace_ca(tmp_path):
    paths = pki.init_pki(tmp_path, servers={"render-node": ("localhost", "127.0.0.1")}, clients=("site-a",))
    assert set(paths) == {"ca", "render-node", "site-a"}
    for name in ("ca", "render-node", "site-a"):
        assert stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode) == 0o600
    loaded = pki.Credential.load(tmp_path, "render-node")
    san = loaded.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(FileExistsError):
        pki.init_pki(tmp_path)
