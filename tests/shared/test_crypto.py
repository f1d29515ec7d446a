"""HPKE sealing to a node key, Ed25519 domain separation, key files, and at-rest data keys."""
from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from megaportrait.shared import crypto


@pytest.fixture(scope="module")
def node_key() -> crypto.HpkePrivateKey:
    return crypto.HpkePrivateKey.generate()


def test_hpke_round_trip_binds_info(node_key, astronaut):
    plaintext = astronaut.tobytes()
    sealed = crypto.hpke_seal(plaintext, node_key.public_key(), b"job-1")
    assert plaintext not in sealed
    # hybrid KEM encapsulation (1120 bytes) + 16-byte tag of overhead
    assert len(sealed) == len(plaintext) + 1120 + 16
    assert crypto.hpke_open(sealed, node_key, b"job-1") == plaintext
    with pytest.raises(crypto.DecryptionFailed):
        crypto.hpke_open(sealed, node_key, b"job-2")


def test_hpke_wrong_key_and_modified_ciphertext_fail(node_key):
    sealed = crypto.hpke_seal(b"adapter bytes", node_key.public_key(), b"ctx")
    with pytest.raises(crypto.DecryptionFailed):
        crypto.hpke_open(sealed, crypto.HpkePrivateKey.generate(), b"ctx")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(crypto.DecryptionFailed):
        crypto.hpke_open(bytes(flipped), node_key, b"ctx")


def test_public_key_bytes_round_trip_and_fingerprint(node_key):
    pub = node_key.public_key()
    again = crypto.HpkePublicKey.from_bytes(pub.to_bytes())
    assert again == pub and again.fingerprint() == pub.fingerprint()
    assert crypto.HpkePublicKey.from_bytes(crypto.HpkePrivateKey.generate().public_key().to_bytes()).fingerprint() != pub.fingerprint()
    with pytest.raises(crypto.KeyFileError, match="1216 bytes"):
        crypto.HpkePublicKey.from_bytes(pub.to_bytes()[:-1])
    assert "x25519" not in repr(node_key) and node_key.x25519.hex() not in repr(node_key)


def test_key_files_are_private_and_round_trip(tmp_path, node_key):
    path = crypto.save_hpke_private(node_key, tmp_path / "k" / "node_hpke.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.load_hpke_private(path).to_bytes() == node_key.to_bytes()
    signing = Ed25519PrivateKey.generate()
    spath = crypto.save_ed25519_private(signing, tmp_path / "k" / "sign.pem")
    assert stat.S_IMODE(spath.stat().st_mode) == 0o600
    assert crypto.ed25519_fingerprint(crypto.load_ed25519_private(spath)) == crypto.ed25519_fingerprint(signing)
    with pytest.raises(crypto.KeyFileError, match="expected an Ed25519 private key|not an unencrypted PEM"):
        crypto.load_ed25519_private(path)
    with pytest.raises(crypto.KeyFileError, match="cannot read"):
        crypto.load_hpke_private(tmp_path / "missing.json")


def test_node_public_file_detects_altered_fingerprint(tmp_path, node_key):
    signing = Ed25519PrivateKey.generate()
    pub = crypto.NodePublicKeys(node_id="node-a", hpke=node_key.public_key(), signing=signing.public_key())
    (tmp_path / "node_public.json").write_bytes(pub.to_json())
    loaded = crypto.NodePublicKeys.load(tmp_path / "node_public.json")
    assert loaded.hpke == pub.hpke and loaded.node_id == "node-a"
    other = crypto.HpkePrivateKey.generate().public_key()
    altered = pub.to_json().replace(crypto._b64(pub.hpke.to_bytes()).encode(), crypto._b64(other.to_bytes()).encode())
    (tmp_path / "altered.json").write_bytes(altered)
    with pytest.raises(crypto.KeyFileError, match="fingerprint does not match"):
        crypto.NodePublicKeys.load(tmp_path / "altered.json")


def test_signatures_are_domain_separated():
    key = Ed25519PrivateKey.generate()
    sig = crypto.sign(key, "megaportrait/a", b"message")
    assert crypto.verify(key.public_key(), "megaportrait/a", b"message", sig)
    assert not crypto.verify(key.public_key(), "megaportrait/b", b"message", sig)
    assert not crypto.verify(key.public_key(), "megaportrait/a", b"messagE", sig)
    assert not crypto.verify(Ed25519PrivateKey.generate().public_key(), "megaportrait/a", b"message", sig)


def test_at_rest_encryption_needs_key_and_context():
    key = crypto.new_data_key()
    blob = crypto.encrypt_at_rest(key, b"png bytes", b"job-1\0result")
    assert b"png bytes" not in blob
    assert crypto.decrypt_at_rest(key, blob, b"job-1\0result") == b"png bytes"
    with pytest.raises(crypto.DecryptionFailed):
        crypto.decrypt_at_rest(key, blob, b"job-2\0result")
    with pytest.raises(crypto.DecryptionFailed):
        crypto.decrypt_at_rest(crypto.new_data_key(), blob, b"job-1\0result")


def test_canonical_json_is_order_independent():
    assert crypto.canonical_json({"b": 1, "a": [1, "x"]}) == crypto.canonical_json({"a": [1, "x"], "b": 1}) == b'{"a":[1,"x"],"b":1}'
    with pytest.raises(ValueError):
        crypto.canonical_json({"x": float("nan")})
