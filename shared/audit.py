"""A tamper-evident audit log: append-only, hash-chained, Ed25519-signed entries and signed checkpoints.

Modelled on transparency logs: each entry carries the hash of the one before it and is signed by the component
that wrote it; a checkpoint signs (size, head hash) so that dropping entries from the end is caught too. The
verifier (`verify`) is the only judge: it needs the log, its checkpoints and the writer's public key, nothing else,
and says which line is at fault (edited, dropped, reordered, truncated).

Files: `<name>.jsonl` holds one entry per line, `<name>.jsonl.checkpoints` one checkpoint per line. Each append is
written and fsync'ed under an exclusive file lock, so several processes of one component may share a log.

Entries say who did what to which data *by hash*, under which policy version, with what outcome; never names,
photos or other personal data (`person` is the pseudonymous person_ref).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import MegaPortraitError

log = logging.getLogger("megaportrait.audit")

Outcome = Literal["ok", "refused", "failed"]
OUTCOMES: tuple[str, ...] = ("ok", "refused", "failed")
GENESIS = "0" * 64
_ENTRY_DOMAIN = b"megaportrait-audit-entry-v1\n"
_CHECKPOINT_DOMAIN = b"megaportrait-audit-checkpoint-v1\n"
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_CHECKPOINT_INTERVAL_S = 300.0
_ENTRY_FIELDS = ("seq", "ts", "component", "actor", "action", "person", "data", "policy", "outcome", "detail", "prev")


class AuditError(MegaPortraitError):
    """The audit log cannot be written or read (e.g. the file is not an audit log, or the key does not match)."""

    reason = "audit_error"


# --- keys -------------------------------------------------------------------------------------------------------


def generate_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key, write it (PKCS#8 PEM, mode 0600) and its public key (`<path>.pub`, raw hex)."""
    p = Path(path)
    if p.exists():
        raise AuditError(f"{p} already exists; refusing to overwrite a signing key")
    p.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    Path(f"{p}.pub").write_text(public_key_hex(key.public_key()) + "\n")
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key written by `generate_signing_key`."""
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"signing key {p} does not exist; create one with `megaportrait audit keygen {p}`")
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{p} is not an Ed25519 private key")
    return key


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The component's key at `path`, created on first start."""
    return load_signing_key(path) if Path(path).is_file() else generate_signing_key(path)


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as hex: what a verifier is given."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key(source: str | bytes | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key from 64 hex characters, PEM bytes, or a file holding either (e.g. `<key>.pub`, a node's .pem)."""
    if isinstance(source, Ed25519PublicKey):
        return source
    data = source if isinstance(source, bytes) else str(source).strip().encode()
    if not data.startswith(b"-----BEGIN") and not _is_hex_key(data):
        p = Path(os.fsdecode(data))
        if not p.is_file():
            raise AuditError(f"public key {os.fsdecode(data)[:80]!r} is neither 64 hex characters, PEM, nor a readable file")
        data = p.read_bytes().strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"expected an Ed25519 key, got {type(key).__name__}")
            return key
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode()))
    except ValueError as exc:
        raise AuditError(f"not an Ed25519 public key: {exc}") from exc


def _is_hex_key(data: bytes) -> bool:
    return len(data) == 64 and all(c in b"0123456789abcdefABCDEF" for c in data)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short, stable name for a key: the first 16 hex characters of sha256(raw public key)."""
    return hashlib.sha256(bytes.fromhex(public_key_hex(key))).hexdigest()[:16]


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding that is hashed and signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- records ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    """One signed line of the log.

    component: which component wrote it (e.g. "site:alpha", "render-node:n1"); actor: who asked (a role and a
    pseudonymous id, e.g. "operator:3fa2c1"); action: dotted verb ("consent.grant", "job.render",
    "retention.delete"); person: a person_ref or ""; data: sha256 hashes of the records concerned; policy: the
    policy version hash in force; outcome: ok / refused / failed; detail: small non-personal facts (counts, reasons).
    """

    seq: int
    ts: str
    component: str
    actor: str
    action: str
    person: str
    data: tuple[str, ...]
    policy: str
    outcome: str
    detail: dict
    prev: str
    hash: str
    sig: str

    def body(self) -> dict:
        return {
            "seq": self.seq, "ts": self.ts, "component": self.component, "actor": self.actor, "action": self.action,
            "person": self.person, "data": list(self.data), "policy": self.policy, "outcome": self.outcome,
            "detail": self.detail, "prev": self.prev,
        }  # fmt: skip

    def to_json(self) -> dict:
        return {**self.body(), "hash": self.hash, "sig": self.sig}

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.ts)

    @classmethod
    def from_json(cls, obj: dict) -> "AuditEntry":
        missing = [f for f in (*_ENTRY_FIELDS, "hash", "sig") if f not in obj]
        if missing:
            raise ValueError(f"missing fields {missing}")
        return cls(
            seq=int(obj["seq"]), ts=str(obj["ts"]), component=str(obj["component"]), actor=str(obj["actor"]),
            action=str(obj["action"]), person=str(obj["person"]), data=tuple(obj["data"]), policy=str(obj["policy"]),
            outcome=str(obj["outcome"]), detail=dict(obj["detail"]), prev=str(obj["prev"]), hash=str(obj["hash"]),
            sig=str(obj["sig"]),
        )  # fmt: skip


def entry_hash(body: dict) -> str:
    return hashlib.sha256(_ENTRY_DOMAIN + canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement "the log had `size` entries and its last entry's hash was `head`" at time `ts`."""

    size: int
    head: str
    ts: str
    key_id: str
    sig: str

    def signed_bytes(self) -> bytes:
        return _CHECKPOINT_DOMAIN + canonical_json({"size": self.size, "head": self.head, "ts": self.ts, "key_id": self.key_id})

    def to_json(self) -> dict:
        return {"size": self.size, "head": self.head, "ts": self.ts, "key_id": self.key_id, "sig": self.sig}

    @classmethod
    def from_json(cls, obj: dict) -> "Checkpoint":
        return cls(size=int(obj["size"]), head=str(obj["head"]), ts=str(obj["ts"]), key_id=str(obj["key_id"]), sig=str(obj["sig"]))

    def to_text(self) -> str:
        """One line of JSON: how a checkpoint travels in Flower configs and metrics."""
        return canonical_json(self.to_json()).decode()

    @classmethod
    def from_text(cls, text: str) -> "Checkpoint":
        try:
            return cls.from_json(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            raise AuditError(f"not a checkpoint ({exc})") from exc


def _last_checkpoint(path: Path) -> Checkpoint | None:
    """The last line of a checkpoint file, or None when there is none or it is not a checkpoint."""
    if not path.is_file() or not path.stat().st_size:
        return None
    with open(path, "rb") as fh:
        raw = _last_line(fh, os.fstat(fh.fileno()).st_size)
    try:
        return Checkpoint.from_json(json.loads(raw))
    except (ValueError, TypeError, KeyError):
        return None


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --- the writer -------------------------------------------------------------------------------------------------


class AuditLog:
    """Appends signed, chained entries to one JSON-lines file (`path`), with checkpoints beside it.

    `checkpoint_every`: write a signed checkpoint after this many appends, and `checkpoint_interval_s` after the first
    append that comes this long after the last checkpoint (0 turns either off; `checkpoint()` and `close()` always
    write one; `run_checkpoints` also writes one every interval while entries wait uncovered).
    At start-up a non-empty log whose last checkpoint does not cover it (the previous run was killed) gets a
    checkpoint of the size at which that run ended.
    `fsync`: flush each append to disk before returning (on by default: an entry that was acknowledged survives a
    crash).
    """

    def __init__(
        self,
        path: str | Path,
        key: Ed25519PrivateKey,
        *,
        component: str,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        fsync: bool = True,
    ) -> None:
        self.path = Path(path)
        self.checkpoint_path = Path(f"{self.path}.checkpoints")
        self.component = component
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self._last_checkpoint = time.monotonic()
        self.fsync = fsync
        self._key = key
        self._key_id = key_id(key)
        self._lock = threading.Lock()
        self._known_size = -1  # file size in bytes when we last learnt (seq, head)
        self._next_seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._last_cp: Checkpoint | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._checkpoint_at_start()

    def _checkpoint_at_start(self) -> None:
        """Cover what the previous run appended after its last checkpoint (it may have been killed before closing)."""
        try:
            size, head = self._current()
        except AuditError as exc:
            log.error("%s; no start-up checkpoint written", exc)
            return
        last = _last_checkpoint(self.checkpoint_path)
        if last is not None and last.size > size:
            log.error("%s: has %d entries but its checkpoint of %s says %d: entries were removed from the end; "
                      "run `megaportrait audit verify --witness`", self.path, size, last.ts, last.size)  # fmt: skip
        if size == 0 or (last is not None and (last.size, last.head) == (size, head)):
            self._last_cp = last
            return
        self.checkpoint()

    def _current(self) -> tuple[int, str]:
        """(size, head) of the file as it is now, whoever appended last."""
        with self._lock, open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            try:
                self._refresh_tail(fh)
                return self._next_seq, self._head
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def _refresh_tail(self, fh) -> None:
        """Re-read the last entry when the file changed under us (another process appended)."""
        size = os.fstat(fh.fileno()).st_size
        if size == self._known_size:
            return
        self._next_seq, self._head = 0, GENESIS
        if size:
            last = _last_line(fh, size)
            try:
                obj = json.loads(last)
                self._next_seq, self._head = int(obj["seq"]) + 1, str(obj["hash"])
            except (ValueError, KeyError) as exc:
                raise AuditError(f"{self.path}: last line is not an audit entry ({exc}); run `megaportrait audit verify`") from exc
        self._known_size = size

    def append(
        self,
        action: str,
        *,
        actor: str,
        outcome: Outcome = "ok",
        person: str = "",
        data: Iterable[str] = (),
        policy: str = "",
        detail: dict | None = None,
    ) -> AuditEntry:
        """Sign and append one entry; returns it once it is on disk."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock, open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                self._refresh_tail(fh)
                body = {
                    "seq": self._next_seq, "ts": _now_iso(), "component": self.component, "actor": actor,
                    "action": action, "person": person, "data": list(data), "policy": policy, "outcome": outcome,
                    "detail": detail or {}, "prev": self._head,
                }  # fmt: skip
                digest = entry_hash(body)
                sig = self._key.sign(bytes.fromhex(digest)).hex()
                entry = AuditEntry.from_json({**body, "hash": digest, "sig": sig})
                line = canonical_json(entry.to_json()) + b"\n"
                fh.write(line)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
                self._known_size = os.fstat(fh.fileno()).st_size
                self._next_seq, self._head = entry.seq + 1, digest
                self._since_checkpoint += 1
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        due_count = self.checkpoint_every and self._since_checkpoint >= self.checkpoint_every
        due_time = self.checkpoint_interval_s and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s
        if due_count or due_time:
            self.checkpoint()
        return entry

    def checkpoint(self) -> Checkpoint:
        """Sign the current (size, head) and append it to the checkpoint file."""
        with self._lock, open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            try:
                self._refresh_tail(fh)
                size, head = self._next_seq, self._head
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            ts = _now_iso()
            unsigned = Checkpoint(size=size, head=head, ts=ts, key_id=self._key_id, sig="")
            cp = Checkpoint(size=size, head=head, ts=ts, key_id=self._key_id, sig=self._key.sign(unsigned.signed_bytes()).hex())
            with open(self.checkpoint_path, "ab") as cf:
                cf.write(canonical_json(cp.to_json()) + b"\n")
                cf.flush()
                if self.fsync:
                    os.fsync(cf.fileno())
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            self._last_cp = cp
        return cp

    def current_checkpoint(self) -> Checkpoint:
        """A signed checkpoint covering every entry now in the log: the last one when it still does, else a new one.

        What a component hands to its witnesses with each reply.
        """
        size, head = self._current()
        last = self._last_cp
        if last is not None and (last.size, last.head) == (size, head):
            return last
        return self.checkpoint()

    def run_checkpoints(self, stop: threading.Event) -> threading.Thread:
        """A daemon thread that checkpoints every `checkpoint_interval_s` while this process left entries uncovered."""

        def loop() -> None:
            while not stop.wait(self.checkpoint_interval_s):
                if self._since_checkpoint:
                    try:
                        self.checkpoint()
                    except (AuditError, OSError):
                        log.exception("periodic audit checkpoint of %s failed", self.path)

        thread = threading.Thread(target=loop, name="audit-checkpoints", daemon=True)
        if self.checkpoint_interval_s:
            thread.start()
        return thread

    def close(self) -> Checkpoint | None:
        """At shutdown: checkpoint what was appended since the last checkpoint (None when nothing was)."""
        return self.checkpoint() if self._since_checkpoint else None


def open_component_log(log_path: str | Path, key_path: str | Path, *, component: str,
                       checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> AuditLog:
    """A component's audit log at start-up: its signing key is created on first start (public key beside it)."""
    return AuditLog(log_path, load_or_create_signing_key(key_path), component=component, checkpoint_every=checkpoint_every)


def _last_line(fh, size: int) -> bytes:
    block = 4096
    pos = size
    buf = b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return buf.rstrip(b"\n")


# --- reading and verifying ----------------------------------------------------------------------------------------


def read_entries(path: str | Path) -> Iterator[AuditEntry]:
    """Parse entries in file order, without checking them (use `verify` for that)."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():
                try:
                    yield AuditEntry.from_json(json.loads(raw))
                except (ValueError, TypeError) as exc:
                    raise AuditError(f"{path}:{n}: not an audit entry ({exc})") from exc


def read_checkpoints(path: str | Path) -> list[Checkpoint]:
    p = Path(f"{path}.checkpoints")
    if not p.is_file():
        return []
    out = []
    for n, raw in enumerate(p.read_bytes().splitlines(), start=1):
        if raw.strip():
            try:
                out.append(Checkpoint.from_json(json.loads(raw)))
            except (ValueError, TypeError, KeyError) as exc:
                raise AuditError(f"{p}:{n}: not a checkpoint ({exc})") from exc
    return out


ProblemKind = Literal["edited", "bad_signature", "dropped", "reordered", "duplicated", "chain_broken", "truncated", "bad_checkpoint", "unreadable"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the log: `line` is the 1-based line in the log file (None for the whole file)."""

    kind: ProblemKind
    line: int | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "log"
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{where}{seq}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """What the verifier found. `ok` only when there are no problems at all."""

    path: Path
    entries: int
    checkpoints: int
    last_checkpoint_size: int | None
    head: str
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            cp = f", checkpoint at size {self.last_checkpoint_size}" if self.last_checkpoint_size is not None else ", no checkpoint"
            return f"{self.path}: OK: {self.entries} entries, chain and signatures intact{cp}, head {self.head[:16]}"
        return f"{self.path}: {len(self.problems)} problem(s):\n" + "\n".join(f"  {p}" for p in self.problems)


def _sig_ok(public_key: Ed25519PublicKey, sig_hex: str, message: bytes) -> bool:
    try:
        public_key.verify(bytes.fromhex(sig_hex), message)
        return True
    except (InvalidSignature, ValueError):
        return False


def verify(
    path: str | Path,
    public_key: Ed25519PublicKey | str | Path,
    *,
    trusted_checkpoints: Sequence[Checkpoint] = (),
) -> VerifyReport:
    """Check every entry's hash, signature and place in the chain, and every checkpoint against the entries.

    Needs only the public key. `trusted_checkpoints` are checkpoints the reviewer kept elsewhere (e.g. copied off
    the machine): they catch a log and its checkpoint file truncated together.
    """
    pub = load_public_key(public_key)
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log {path} does not exist")
    problems: list[Problem] = []
    rows: list[tuple[int, AuditEntry]] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                problems.append(Problem("unreadable", n, None, "blank line inside the log"))
                continue
            try:
                entry = AuditEntry.from_json(json.loads(raw))
            except (ValueError, TypeError) as exc:
                problems.append(Problem("unreadable", n, None, f"not an audit entry ({exc}): edited or corrupted"))
                continue
            rows.append((n, entry))

    by_seq: dict[int, tuple[int, AuditEntry]] = {}
    for n, e in rows:
        if entry_hash(e.body()) != e.hash:
            problems.append(Problem("edited", n, e.seq, "content does not match its hash: the entry was edited after it was written"))
        elif not _sig_ok(pub, e.sig, bytes.fromhex(e.hash)):
            problems.append(Problem("bad_signature", n, e.seq, "signature does not verify with this public key: forged or re-signed entry"))
        if e.seq in by_seq:
            problems.append(Problem("duplicated", n, e.seq, f"seq {e.seq} already appeared at line {by_seq[e.seq][0]}"))
        else:
            by_seq[e.seq] = (n, e)

    # Order: each line's seq must be one more than the line before it. A lower seq means lines were moved.
    for (n_prev, a), (n, b) in zip(rows, rows[1:]):
        if b.seq < a.seq:
            problems.append(Problem("reordered", n, b.seq, f"seq {b.seq} comes after seq {a.seq} (line {n_prev}): entries were reordered"))

    # Missing seqs: dropped entries, reported at the line where the gap shows.
    if by_seq:
        present = sorted(by_seq)
        expected = set(range(0, present[-1] + 1))
        missing = sorted(expected - set(present))
        for run_start, run_end in _runs(missing):
            after = by_seq.get(run_start - 1)
            before = by_seq.get(run_end + 1)
            at = before[0] if before else None
            span = f"seq {run_start}" if run_start == run_end else f"seqs {run_start}..{run_end}"
            ctx = f" (between lines {after[0]} and {before[0]})" if after and before else ""
            problems.append(Problem("dropped", at, run_start, f"{span} missing{ctx}: entries were deleted"))

    # Chain: each entry's prev must be the hash of the entry with seq - 1 (by seq, so a reorder is reported once).
    for n, e in rows:
        if e.seq == 0:
            if e.prev != GENESIS:
                problems.append(Problem("chain_broken", n, e.seq, "first entry does not start from the genesis hash"))
            continue
        prior = by_seq.get(e.seq - 1)
        if prior is not None and prior[1].hash != e.prev:
            problems.append(Problem("chain_broken", n, e.seq, f"prev hash does not match entry seq {e.seq - 1} (line {prior[0]})"))

    # Checkpoints: each must be signed, and the entry at size - 1 must have the head it names. Witnessed ones (kept
    # by another party) are named as such: they are what catches a log cut together with its own checkpoint file.
    checkpoints: list[tuple[Checkpoint, str]] = []
    seen: set[str] = set()
    for cp, label in [(cp, "checkpoint") for cp in read_checkpoints(path)] + [(cp, "witnessed checkpoint") for cp in trusted_checkpoints]:
        if cp.sig not in seen:
            seen.add(cp.sig)
            checkpoints.append((cp, label))
    last_size: int | None = None
    count = len(rows)
    top = max(by_seq) + 1 if by_seq else 0
    worst_cut: tuple[int, str, str] | None = None  # the largest size a valid checkpoint names beyond the log's end
    for cp, label in checkpoints:
        if not _sig_ok(pub, cp.sig, cp.signed_bytes()):
            problems.append(Problem("bad_checkpoint", None, None, f"{label} at size {cp.size} ({cp.ts}) has a bad signature"))
            continue
        last_size = cp.size if last_size is None else max(last_size, cp.size)
        if cp.size == 0:
            continue
        at = by_seq.get(cp.size - 1)
        if at is None:
            if cp.size > top and (worst_cut is None or cp.size > worst_cut[0]):
                worst_cut = (cp.size, cp.ts, label)
            continue
        if at[1].hash != cp.head:
            problems.append(Problem("chain_broken", at[0], cp.size - 1, f"entry does not match the head signed in the {label} of "
                                    f"{cp.ts}: entries up to seq {cp.size - 1} were removed and others written in their place"))  # fmt: skip
    if worst_cut is not None:
        size, ts, label = worst_cut
        span = f"seq {top}" if size - 1 == top else f"seqs {top}..{size - 1}"
        problems.append(Problem("truncated", None, top, f"{label} of {ts} says the log had {size} entries, it has {top}: "
                                f"{span} missing ({size - top} entries deleted from the end)"))  # fmt: skip
    head = rows[-1][1].hash if rows else GENESIS
    problems.sort(key=lambda p: (p.line if p.line is not None else 1 << 60, p.kind))
    return VerifyReport(path=path, entries=count, checkpoints=len(checkpoints), last_checkpoint_size=last_size, head=head, problems=tuple(problems))


def _runs(values: list[int]) -> Iterator[tuple[int, int]]:
    if not values:
        return
    start = prev = values[0]
    for v in values[1:]:
        if v != prev + 1:
            yield start, prev
            start = v
        prev = v
    yield start, prev


# --- witnesses ---------------------------------------------------------------------------------------------------

_KEY_ID = re.compile(r"[0-9a-f]{16}")

WITNESS_DIR = "witness"
"""Under a component's state dir: the other components' checkpoints it keeps as their witness (`WitnessStore`)."""


class WitnessStore:
    """Checkpoints of other components' logs, kept by a witness in `<directory>/<key_id>.checkpoints` (JSON lines).

    A component that truncates its own log and checkpoint file cannot reach these copies, so `verify` with them
    (`megaportrait audit verify --witness DIR`) still says which entries are missing. The store keeps what it is
    handed without judging it (it may not know the writer's key); the verifier checks every signature.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def keep(self, cp: Checkpoint | None) -> bool:
        """Append `cp` unless it is the last one kept for its key; False when skipped (None, repeat or bad key id)."""
        if cp is None:
            return False
        if not _KEY_ID.fullmatch(cp.key_id):
            log.warning("witness: refusing a checkpoint with key id %r (not 16 hex characters)", cp.key_id[:40])
            return False
        path = self.directory / f"{cp.key_id}.checkpoints"
        if _last_checkpoint(path) == cp:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            fh.write(canonical_json(cp.to_json()) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def keep_text(self, text: str) -> bool:
        """Keep a checkpoint that arrived as `Checkpoint.to_text()` (Flower configs and metrics); "" keeps nothing."""
        if not text:
            return False
        try:
            return self.keep(Checkpoint.from_text(text))
        except AuditError as exc:
            log.warning("witness: %s", exc)
            return False

    def keep_reply(self, reply: Any) -> bool:
        """Keep the `audit_checkpoint` a render node sent with a reply (JobStatus, RenderResult, DeletionConfirmation)."""
        if not reply.HasField("audit_checkpoint"):
            return False
        m = reply.audit_checkpoint
        return self.keep(Checkpoint(size=int(m.size), head=m.head, ts=m.ts, key_id=m.key_id, sig=m.sig))

    def checkpoints(self, key: str | Ed25519PublicKey | None = None) -> list[Checkpoint]:
        """Every checkpoint kept (only those of `key`, a public key or key id, when given)."""
        if key is not None and not isinstance(key, str):
            key = key_id(key)
        files = sorted(self.directory.glob("*.checkpoints")) if key is None else [self.directory / f"{key}.checkpoints"]
        return [cp for f in files if f.is_file() for cp in read_checkpoints(str(f).removesuffix(".checkpoints"))]


# --- filtering (CLI and review page) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryFilter:
    """Which entries a reviewer wants; empty fields match everything. Times are inclusive bounds."""

    person: str = ""
    site: str = ""
    action: str = ""
    outcome: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, e: AuditEntry) -> bool:
        if self.person and e.person != self.person:
            return False
        if self.site and not (e.component == self.site or e.component.startswith(self.site + ":") or e.component.endswith(":" + self.site)):
            return False
        if self.action and not (e.action == self.action or e.action.startswith(self.action + ".")):
            return False
        if self.outcome and e.outcome != self.outcome:
            return False
        if self.since or self.until:
            t = e.time
            if self.since and t < _aware(self.since):
                return False
            if self.until and t > _aware(self.until):
                return False
        return True


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def filter_entries(paths: Iterable[str | Path], flt: EntryFilter, *, skipped: list[str] | None = None) -> list[AuditEntry]:
    """Entries of several logs that match `flt`, merged in time order.

    A line that is not an entry, or a log that cannot be read, raises AuditError; with `skipped` given it is left
    out instead and said there ("<file>:<line>: <reason>"), so one damaged log does not hide the others.
    """
    out = []
    for p in paths:
        if skipped is None:
            out += [e for e in read_entries(p) if flt.matches(e)]
            continue
        try:
            with open(p, "rb") as fh:
                for n, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        e = AuditEntry.from_json(json.loads(raw))
                        if flt.matches(e):  # matching parses the time: a bad one is a bad entry too
                            out.append(e)
                    except (ValueError, TypeError) as exc:
                        skipped.append(f"{Path(p).name}:{n}: not an audit entry ({str(exc)[:200]})")
        except OSError as exc:
            skipped.append(f"{Path(p).name}: cannot be read ({exc.strerror or exc})")
    out.sort(key=lambda e: (e.ts, e.component, e.seq))
    return out


CSV_COLUMNS = ("ts", "component", "seq", "actor", "action", "person", "outcome", "policy", "data", "detail", "hash")


def entry_row(e: AuditEntry) -> dict[str, str]:
    """A flat row for CSV and tables: lists joined by ';', detail as compact JSON."""
    return {
        "ts": e.ts, "component": e.component, "seq": str(e.seq), "actor": e.actor, "action": e.action,
        "person": e.person, "outcome": e.outcome, "policy": e.policy, "data": ";".join(e.data),
        "detail": json.dumps(e.detail, sort_keys=True, separators=(",", ":")), "hash": e.hash,
    }  # fmt: skip
