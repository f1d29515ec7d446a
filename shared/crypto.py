"""Keys and primitives shared by the customer site and the render node.

- HPKE (RFC 9180) with the hybrid post-quantum KEM ML-KEM-768 + X25519, HKDF-SHA256, ChaCha20-Poly1305: the site
  seals identity payloads to the render node's public key.
- Ed25519: sites sign payload headers; the node signs deletion confirmations.
- AES-256-GCM data keys: the node encrypts what it stores, one key per job, so destroying the key destroys the data.

Every signature is domain-separated (``domain NUL message``) so a signature made for one purpose never verifies
for another. Key files are written with mode 0600.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import MegaPortraitError

HPKE_SUITE_NAME = "MLKEM768-X25519/HKDF-SHA256/CHACHA20-POLY1305"
_MLKEM768_PUBLIC_LEN = 1184
_MLKEM768_SEED_LEN = 64
_X25519_LEN = 32
_GCM_NONCE_LEN = 12


class KeyFileError(MegaPortraitError):
    """A key file is missing, unreadable or not the kind of key expected."""

    reason = "key_file_invalid"


class DecryptionFailed(MegaPortraitError):
    """Authenticated decryption failed: wrong key, wrong context, or modified ciphertext."""

    reason = "decryption_failed"


def hpke_suite() -> hpke.Suite:
    """The one HPKE suite MegaPortrait uses (named `HPKE_SUITE_NAME` in payload headers)."""
    return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def canonical_json(obj: object) -> bytes:
    """The one JSON encoding that is signed or bound: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def fingerprint(kind: str, raw: bytes) -> str:
    """sha256 hex of a public key's raw bytes, prefixed by its kind so different key types never collide."""
    return hashlib.sha256(kind.encode() + b"\0" + raw).hexdigest()


# ---------------------------------------------------------------------------------------------------- HPKE keys


@dataclass(frozen=True)
class HpkePublicKey:
    """A render node's HPKE recipient key: ML-KEM-768 public key (1184 bytes) and X25519 public key (32 bytes)."""

    mlkem768: bytes
    x25519: bytes

    def to_bytes(self) -> bytes:
        return self.mlkem768 + self.x25519

    @classmethod
    def from_bytes(cls, data: bytes) -> "HpkePublicKey":
        if len(data) != _MLKEM768_PUBLIC_LEN + _X25519_LEN:
            raise KeyFileError(f"an HPKE public key is {_MLKEM768_PUBLIC_LEN + _X25519_LEN} bytes, got {len(data)}")
        key = cls(mlkem768=bytes(data[:_MLKEM768_PUBLIC_LEN]), x25519=bytes(data[_MLKEM768_PUBLIC_LEN:]))
        key.to_hpke()  # validates both halves
        return key

    def fingerprint(self) -> str:
        return fingerprint("hpke-mlkem768-x25519", self.to_bytes())

    def to_hpke(self) -> hpke.MLKEM768X25519PublicKey:
        try:
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem768),
                x25519.X25519PublicKey.from_public_bytes(self.x25519),
            )
        except ValueError as exc:
            raise KeyFileError(f"not a valid ML-KEM-768 + X25519 public key: {exc}") from exc


@dataclass(frozen=True, repr=False)
class HpkePrivateKey:
    """A render node's HPKE private key, kept as its ML-KEM-768 seed (64 bytes) and X25519 scalar (32 bytes)."""

    mlkem768_seed: bytes
    x25519: bytes

    def __repr__(self) -> str:
        return f"HpkePrivateKey(fingerprint={self.public_key().fingerprint()[:12]}...)"

    @classmethod
    def generate(cls) -> "HpkePrivateKey":
        return cls(
            mlkem768_seed=mlkem.MLKEM768PrivateKey.generate().private_bytes_raw(),
            x25519=x25519.X25519PrivateKey.generate().private_bytes_raw(),
        )

    def _parts(self) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
        return (
            mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem768_seed),
            x25519.X25519PrivateKey.from_private_bytes(self.x25519),
        )

    def public_key(self) -> HpkePublicKey:
        m, x = self._parts()
        return HpkePublicKey(mlkem768=m.public_key().public_bytes_raw(), x25519=x.public_key().public_bytes_raw())

    def to_hpke(self) -> hpke.MLKEM768X25519PrivateKey:
        return hpke.MLKEM768X25519PrivateKey(*self._parts())

    def to_bytes(self) -> bytes:
        return self.mlkem768_seed + self.x25519

    @classmethod
    def from_bytes(cls, data: bytes) -> "HpkePrivateKey":
        if len(data) != _MLKEM768_SEED_LEN + _X25519_LEN:
            raise KeyFileError(f"an HPKE private key is {_MLKEM768_SEED_LEN + _X25519_LEN} bytes, got {len(data)}")
        return cls(mlkem768_seed=bytes(data[:_MLKEM768_SEED_LEN]), x25519=bytes(data[_MLKEM768_SEED_LEN:]))


def hpke_seal(plaintext: bytes, recipient: HpkePublicKey, info: bytes) -> bytes:
    """Single-shot HPKE base mode: returns enc || ciphertext. `info` is bound into the key schedule."""
    return hpke_suite().encrypt(plaintext, recipient.to_hpke(), info=info)


def hpke_open(sealed: bytes, key: HpkePrivateKey, info: bytes) -> bytes:
    """Inverse of `hpke_seal`, in memory. Raises DecryptionFailed when key, info or ciphertext do not match."""
    try:
        return hpke_suite().decrypt(sealed, key.to_hpke(), info=info)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionFailed("HPKE decryption failed: wrong key, different context or modified ciphertext") from exc


# ------------------------------------------------------------------------------------------------- Ed25519 keys


def ed25519_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return fingerprint("ed25519", pub.public_bytes_raw())


def sign(key: Ed25519PrivateKey, domain: str, message: bytes) -> bytes:
    """Ed25519 signature over ``domain NUL message``."""
    return key.sign(domain.encode() + b"\0" + message)


def verify(key: Ed25519PublicKey, domain: str, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `key`'s signature over ``domain NUL message``."""
    try:
        key.verify(signature, domain.encode() + b"\0" + message)
    except InvalidSignature:
        return False
    return True


def ed25519_public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_ed25519_public(data_or_path: bytes | str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes or a PEM file."""
    data = _read(data_or_path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{_name(data_or_path)}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{_name(data_or_path)}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def save_ed25519_private(key: Ed25519PrivateKey, path: str | Path) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return write_secret(path, pem)


def load_ed25519_private(path: str | Path) -> Ed25519PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def save_hpke_private(key: HpkePrivateKey, path: str | Path) -> Path:
    doc = {"kind": "megaportrait-hpke-private-key", "suite": HPKE_SUITE_NAME, "key": _b64(key.to_bytes())}
    return write_secret(path, canonical_json(doc) + b"\n")


def load_hpke_private(path: str | Path) -> HpkePrivateKey:
    doc = _read_json(path)
    if doc.get("kind") != "megaportrait-hpke-private-key" or doc.get("suite") != HPKE_SUITE_NAME:
        raise KeyFileError(f"{path}: not a MegaPortrait HPKE private key for suite {HPKE_SUITE_NAME}")
    return HpkePrivateKey.from_bytes(_unb64(doc.get("key", ""), path))


# -------------------------------------------------------------------------------------------- node public info


@dataclass(frozen=True)
class NodePublicKeys:
    """What a site needs to seal to a render node and to check its deletion confirmations."""

    node_id: str
    hpke: HpkePublicKey
    signing: Ed25519PublicKey

    def to_json(self) -> bytes:
        return canonical_json(
            {
                "kind": "megaportrait-render-node-public",
                "node_id": self.node_id,
                "hpke_suite": HPKE_SUITE_NAME,
                "hpke_public_key": _b64(self.hpke.to_bytes()),
                "hpke_fingerprint": self.hpke.fingerprint(),
                "signing_public_key": _b64(self.signing.public_bytes_raw()),
                "signing_fingerprint": ed25519_fingerprint(self.signing),
            }
        )

    @classmethod
    def load(cls, path: str | Path) -> "NodePublicKeys":
        """Read `node_public.json` (written by `megaportrait render-node keygen`); fingerprints are re-checked."""
        doc = _read_json(path)
        if doc.get("kind") != "megaportrait-render-node-public" or doc.get("hpke_suite") != HPKE_SUITE_NAME:
            raise KeyFileError(f"{path}: not a render node public key file for suite {HPKE_SUITE_NAME}")
        hpke_key = HpkePublicKey.from_bytes(_unb64(doc.get("hpke_public_key", ""), path))
        try:
            signing = Ed25519PublicKey.from_public_bytes(_unb64(doc.get("signing_public_key", ""), path))
        except ValueError as exc:
            raise KeyFileError(f"{path}: bad signing_public_key ({exc})") from exc
        if hpke_key.fingerprint() != doc.get("hpke_fingerprint") or ed25519_fingerprint(signing) != doc.get("signing_fingerprint"):
            raise KeyFileError(f"{path}: a fingerprint does not match its key; the file was altered")
        return cls(node_id=str(doc.get("node_id", "")), hpke=hpke_key, signing=signing)


# ---------------------------------------------------------------------------------------- data keys (at rest)


def new_data_key() -> bytes:
    """A fresh 256-bit AES-GCM key."""
    return AESGCM.generate_key(bit_length=256)


def encrypt_at_rest(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: returns nonce (12 bytes) || ciphertext+tag. `aad` names what the blob is (job id, field)."""
    nonce = os.urandom(_GCM_NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_at_rest(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:_GCM_NONCE_LEN], blob[_GCM_NONCE_LEN:], aad)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionFailed("stored blob cannot be decrypted with this data key") from exc


# ------------------------------------------------------------------------------------------------------ files


def write_secret(path: str | Path, data: bytes) -> Path:
    """Write `data` atomically with mode 0600 (the file never exists with wider permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, where: object) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where}: invalid base64 ({exc})") from exc


def _name(data_or_path: object) -> str:
    return str(data_or_path) if isinstance(data_or_path, (str, Path)) else "<bytes>"


def _read(data_or_path: bytes | str | Path) -> bytes:
    if isinstance(data_or_path, (bytes, bytearray)):
        return bytes(data_or_path)
    try:
        return Path(data_or_path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{data_or_path}: cannot read key file ({exc.strerror or exc})") from exc


def _read_json(path: str | Path) -> dict:
    try:
        doc = json.loads(_read(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise KeyFileError(f"{path}: expected a JSON object")
    return doc
