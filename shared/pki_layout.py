"""The deployment's PKI on disk: one folder per machine, built on `shared.pki` (see `shared.pki_cli` for the tree).

Besides the X.509 certificates for mutual TLS, each site gets a Flower SuperNode authentication key: an EC P-384
key pair in OpenSSH format (what `flower-supernode --auth-supernode-private-key` and `flwr supernode register`
read). Private keys are written 0600 and never overwritten.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .crypto import write_secret
from .errors import MegaPortraitError
from .pki import Credential, create_ca, issue_certificate

SITE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
INVENTORY = "inventory.json"


class PKILayoutError(MegaPortraitError):
    """The PKI folder cannot be created or extended as asked (existing CA, bad site id, missing CA key)."""

    reason = "pki_invalid"


def _check_site_id(site: str) -> None:
    if not SITE_ID.match(site):
        raise PKILayoutError(
            f"site id {site!r} must be 1-63 characters of lower-case letters, digits and '-', starting with a letter or digit"
        )


def _split_names(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import ipaddress

    dns, ips = [], []
    for name in dict.fromkeys(names):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
        else:
            ips.append(name)
    return tuple(dns), tuple(ips)


def _describe(cred: Credential, role: str, files: list[Path], root: Path) -> dict:
    cert = cred.certificate
    return {
        "role": role,
        "subject": cred.common_name,
        "files": [str(f.relative_to(root)) for f in files],
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _server(ca: Credential, root: Path, folder: str, name: str, names: tuple[str, ...], days: int) -> dict:
    dns, ips = _split_names(names)
    if not (dns or ips):
        raise PKILayoutError(f"the {folder} certificate needs at least one DNS name or IP address")
    cred = issue_certificate(ca, name, role="server", dns_names=dns, ip_addresses=ips, days=days)
    d = root / folder
    (d / "ca.pem").parent.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_bytes(ca.cert_pem)
    item = _describe(cred, folder, [d / "ca.pem", *cred.save(d, name)], root)
    item["names"] = list(names)
    return item


def node_auth_keypair() -> tuple[bytes, bytes]:
    """A Flower SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _site(ca: Credential, root: Path, site: str, days: int) -> dict:
    _check_site_id(site)
    d = root / "sites" / site
    if (d / f"{site}.key").exists() or (d / "node-auth.key").exists():
        raise PKILayoutError(f"{d} already holds keys for site {site!r}; remove them first to re-issue")
    cred = issue_certificate(ca, site, role="client", days=days)
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_bytes(ca.cert_pem)
    files = [d / "ca.pem", *cred.save(d, site)]
    private, public = node_auth_keypair()
    files.append(write_secret(d / "node-auth.key", private))
    (d / "node-auth.pub").write_bytes(public)
    registered = root / "coordinator" / "sites"  # what `megaportrait coordinator register --credentials` reads
    registered.mkdir(parents=True, exist_ok=True)
    (registered / f"{site}.pub").write_bytes(public)
    files += [d / "node-auth.pub", registered / f"{site}.pub"]
    return _describe(cred, "site", files, root)


def create(
    root: str | Path,
    *,
    sites: list[str],
    coordinator_names: tuple[str, ...],
    render_node_names: tuple[str, ...],
    days: int = 365,
) -> dict:
    """Create the whole tree under `root`; refuses if `root/ca/ca.key` exists. Returns the inventory (also saved)."""
    root = Path(root)
    for site in sites:
        _check_site_id(site)
    if len(set(sites)) != len(sites):
        raise PKILayoutError(f"site ids repeat: {sites}")
    if (root / "ca" / "ca.key").exists():
        raise PKILayoutError(f"{root / 'ca' / 'ca.key'} exists: replacing the CA would orphan every certificate it issued; use `pki add-site`")
    ca = create_ca()
    issued = [_describe(ca, "ca", list(ca.save(root / "ca", "ca")), root)]
    issued.append(_server(ca, root, "coordinator", "superlink", coordinator_names, days))
    issued.append(_server(ca, root, "render-node", "render-node", render_node_names, days))
    issued += [_site(ca, root, site, days) for site in sites]
    inventory = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "issued": issued}
    (root / INVENTORY).write_text(json.dumps(inventory, indent=2) + "\n")
    return inventory


def add_site(root: str | Path, site: str, *, days: int = 365) -> dict:
    """Issue one more site's identity from `root/ca`; appends it to the inventory."""
    root = Path(root)
    try:
        ca = Credential.load(root / "ca", "ca")
    except MegaPortraitError as exc:
        raise PKILayoutError(f"{root / 'ca'}: no usable CA ({exc}); run `megaportrait pki init` first") from exc
    item = _site(ca, root, site, days)
    inv_path = root / INVENTORY
    inventory = json.loads(inv_path.read_text()) if inv_path.exists() else {"issued": []}
    inventory["issued"].append(item)
    inv_path.write_text(json.dumps(inventory, indent=2) + "\n")
    return item


def check(root: str | Path, *, now: datetime | None = None) -> list[dict]:
    """Every certificate under `root` with status ok / expired / foreign (not signed by `root/ca/ca.pem`)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    root = Path(root)
    ca_path = root / "ca" / "ca.pem"
    if not ca_path.is_file():
        raise PKILayoutError(f"{ca_path} is missing: not a folder made by `megaportrait pki init`")
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    now = now or datetime.now(timezone.utc)
    rows = []
    for path in sorted(root.rglob("*.pem")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if path.name == "ca.pem" and cert == ca:
            if path != ca_path:
                continue
        try:
            cert.verify_directly_issued_by(ca)
            status = "ok"
        except (ValueError, TypeError, InvalidSignature):
            status = "foreign"
        if status == "ok" and not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            status = "expired"
        cn = cert.subject.rfc4514_string()
        rows.append({"path": str(path.relative_to(root)), "subject": cn, "status": status, "not_after": cert.not_valid_after_utc.date().isoformat()})
    return rows
