"""A small private PKI for mutual TLS between MegaPortrait components (render node, coordinator, sites).

One self-signed CA (ECDSA P-256) issues server certificates (serverAuth, DNS/IP names) and client certificates
(clientAuth, common name = the component's identity, e.g. a site id). Servers require a client certificate signed by
the CA; the client certificate's common name is the caller's identity on the server.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .crypto import KeyFileError, write_secret

Role = Literal["server", "client"]


@dataclass(frozen=True, repr=False)
class Credential:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"Credential(subject={self.common_name!r})"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def common_name(self) -> str:
        attrs = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    def save(self, directory: str | Path, name: str) -> tuple[Path, Path]:
        """Write `<name>.pem` (certificate) and `<name>.key` (private key, mode 0600)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{name}.pem"
        cert_path.write_bytes(self.cert_pem)
        return cert_path, write_secret(directory / f"{name}.key", self.key_pem)

    @classmethod
    def load(cls, directory: str | Path, name: str) -> "Credential":
        directory = Path(directory)
        try:
            cred = cls(cert_pem=(directory / f"{name}.pem").read_bytes(), key_pem=(directory / f"{name}.key").read_bytes())
        except OSError as exc:
            raise KeyFileError(f"{directory}/{name}.pem|.key: cannot read ({exc.strerror or exc}); run `megaportrait pki init`") from exc
        try:  # parse both now so a bad file is named here, not at TLS handshake time
            x509.load_pem_x509_certificate(cred.cert_pem)
            serialization.load_pem_private_key(cred.key_pem, password=None)
        except ValueError as exc:
            raise KeyFileError(f"{directory}/{name}: not a PEM certificate and key ({exc})") from exc
        return cred


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MegaPortrait"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def create_ca(common_name: str = "MegaPortrait CA", *, days: int = 3650, now: datetime | None = None) -> Credential:
    """A new self-signed CA that may only issue end-entity certificates (path length 0)."""
    now = now or datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Credential(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def issue_certificate(
    ca: Credential,
    common_name: str,
    *,
    role: Role,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    days: int = 365,
    now: datetime | None = None,
) -> Credential:
    """A certificate for `common_name` signed by `ca`.

    role "server" gets serverAuth and needs at least one DNS name or IP address (what clients connect to);
    role "client" gets clientAuth; its common name is the caller's identity on the server.
    """
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    if role == "server" and not (dns_names or ip_addresses):
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    now = now or datetime.now(timezone.utc)
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if role == "client":  # RFC 5280 verifiers expect a SAN; name the identity as a URN
        names.append(x509.UniformResourceIdentifier(f"urn:megaportrait:client:{common_name}"))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Credential(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def init_pki(
    directory: str | Path,
    *,
    servers: dict[str, tuple[str, ...]] | None = None,
    clients: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Create `directory/ca.pem|.key` and one certificate per server (name -> DNS names / IP addresses) and client.

    Refuses to overwrite an existing CA (that would orphan every certificate it issued). Returns name -> cert path.
    """
    directory = Path(directory)
    if (directory / "ca.key").exists():
        raise FileExistsError(f"{directory}/ca.key exists; issue new certificates from it instead of replacing it")
    ca = create_ca()
    paths = {"ca": ca.save(directory, "ca")[0]}
    for name, addresses in (servers or {}).items():
        ips = tuple(a for a in addresses if _is_ip(a))
        dns = tuple(a for a in addresses if not _is_ip(a))
        paths[name] = issue_certificate(ca, name, role="server", dns_names=dns, ip_addresses=ips).save(directory, name)[0]
    for name in clients:
        paths[name] = issue_certificate(ca, name, role="client").save(directory, name)[0]
    return paths


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
