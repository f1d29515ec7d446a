"""The audit log: signed, chained appends; `verify` catches edits, deletions, reorders and truncation, and says where."""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megaportrait.shared import audit
from megaportrait.shared.cli import app


@pytest.fixture()
def key(tmp_path):
    return audit.generate_signing_key(tmp_path / "keys" / "site.key")


def _fill(path: Path, key, n: int = 8, *, checkpoint_every: int = 0, component: str = "site:alpha") -> audit.AuditLog:
    log = audit.AuditLog(path, key, component=component, checkpoint_every=checkpoint_every)
    for i in range(n):
        log.append("job.render" if i % 2 else "consent.check", actor="operator:7f3a", person=f"p{i % 3}",
                   data=[f"{i:064x}"],
                   policy="a" * 64, outcome="ok" if i % 4 else "refused", detail={"i": i})
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_append_and_verify_intact_log(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, key, 10, checkpoint_every=4)
    log.checkpoint()
    report = audit.verify(path, tmp_path / "keys" / "site.key.pub")
    assert report.ok, report.summary()
    assert report.entries == 10 and report.checkpoints == 3 and report.last_checkpoint_size == 10
    entries = list(audit.read_entries(path))
    assert [e.seq for e in entries] == list(range(10))
    assert entries[0].prev == audit.GENESIS and all(b.prev == a.hash for a, b in zip(entries, entries[1:]))
    assert entries[3].policy == "a" * 64 and entries[3].person == "p0" and entries[3].component == "site:alpha"
    # A reopened writer continues the chain where the file ends.
    audit.AuditLog(path, key, component="site:alpha").append("retention.sweep", actor="retention")
    assert audit.verify(path, audit.public_key_hex(key)).ok


def test_verify_catches_an_edit_and_says_where(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    _fill(path, key)
    lines = _lines(path)
    obj = json.loads(lines[4])
    obj["outcome"] = "ok" if obj["outcome"] != "ok" else "refused"
    lines[4] = json.dumps(obj)
    _write(path, lines)
    report = audit.verify(path, key.public_key())
    assert not report.ok
    assert [(p.kind, p.line, p.seq) for p in report.problems] == [("edited", 5, 4)]


def test_verify_catches_a_rehashed_edit_by_its_signature(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    _fill(path, key)
    lines = _lines(path)
    obj = json.loads(lines[2])
    obj["person"] = "someone-else"
    obj["hash"] = audit.entry_hash({k: obj[k] for k in audit._ENTRY_FIELDS})
    lines[2] = json.dumps(obj)
    _write(path, lines)
    kinds = {(p.kind, p.line) for p in audit.verify(path, key.public_key()).problems}
    assert ("bad_signature", 3) in kinds
    assert ("chain_broken", 4) in kinds  # the next entry still points at the original hash


def test_verify_catches_a_deleted_entry(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    _fill(path, key)
    lines = _lines(path)
    del lines[3]
    _write(path, lines)
    report = audit.verify(path, key.public_key())
    assert [(p.kind, p.seq, p.line) for p in report.problems] == [("dropped", 3, 4)]
    assert "between lines 3 and 4" in report.problems[0].message


def test_verify_catches_reordered_entries(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    _fill(path, key)
    lines = _lines(path)
    lines[5], lines[6] = lines[6], lines[5]
    _write(path, lines)
    report = audit.verify(path, key.public_key())
    assert [(p.kind, p.line, p.seq) for p in report.problems] == [("reordered", 7, 5)]
    assert "seq 5 comes after seq 6 (line 6)" in str(report.problems[0])


def test_verify_catches_tail_truncation_through_checkpoints(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, key, 6)
    log.checkpoint()
    kept = audit.read_checkpoints(path)
    _write(path, _lines(path)[:4])
    report = audit.verify(path, key.public_key())
    assert [p.kind for p in report.problems] == ["truncated"]
    # Truncating the checkpoint file as well is caught by a checkpoint the reviewer kept elsewhere.
    Path(f"{path}.checkpoints").write_text("")
    assert audit.verify(path, key.public_key()).ok  # nothing left on the machine to contradict it...
    assert [p.kind for p in audit.verify(path, key.public_key(), trusted_checkpoints=kept).problems] == ["truncated"]


def test_verify_rejects_wrong_key_forged_checkpoint_and_garbage(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, key, 3)
    log.checkpoint()
    other = audit.generate_signing_key(tmp_path / "other.key")
    report = audit.verify(path, other.public_key())
    assert {p.kind for p in report.problems} == {"bad_signature", "bad_checkpoint"}
    lines = _lines(path)
    lines.insert(1, "{not json")
    _write(path, lines)
    assert [(p.kind, p.line) for p in audit.verify(path, key.public_key()).problems] == [("unreadable", 2)]


def _append_many(path: str, key_path: str, who: str, n: int) -> None:
    log = audit.AuditLog(path, audit.load_signing_key(key_path), component=who, checkpoint_every=0)
    for i in range(n):
        log.append("job.render", actor=who, detail={"i": i})


def test_two_processes_appending_keep_one_valid_chain(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), str(tmp_path / "keys" / "site.key"), f"w{i}", 40)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = audit.verify(path, key.public_key())
    assert report.ok, report.summary()
    assert report.entries == 80


def test_filter_and_cli_verify_list_export(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    _fill(path, key, 9)
    other = audit.AuditLog(tmp_path / "render.jsonl", key, component="render-node:n1")
    other.append("revocation.render_delete", actor="site:alpha", person="p1")
    logs = [path, tmp_path / "render.jsonl"]
    p1 = audit.filter_entries(logs, audit.EntryFilter(person="p1"))
    assert [e.person for e in p1] == ["p1"] * 4 and p1[-1].component == "render-node:n1"
    assert len(audit.filter_entries(logs, audit.EntryFilter(site="alpha", action="consent"))) == 5
    assert len(audit.filter_entries(logs, audit.EntryFilter(outcome="refused"))) == 3
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert audit.filter_entries(logs, audit.EntryFilter(since=future)) == []

    runner = CliRunner()
    pub = str(tmp_path / "keys" / "site.key.pub")
    res = runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub])
    assert res.exit_code == 0 and "OK: 9 entries" in res.output
    res = runner.invoke(app, ["audit", "list", *map(str, logs), "--person", "p1", "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert [r["person"] for r in rows] == ["p1"] * 4 and rows[-1]["action"] == "revocation.render_delete"
    out = tmp_path / "export.json"
    res = runner.invoke(app, ["audit", "list", str(path), "--site", "site:alpha", "--outcome", "refused", "-f", "json", "-o", str(out)])
    assert res.exit_code == 0
    assert [e["seq"] for e in json.loads(out.read_text())] == [0, 4, 8]
    res = runner.invoke(app, ["audit", "list", str(path), "--action", "job"])
    assert res.exit_code == 0 and "4 entries" in res.output

    lines = _lines(path)
    del lines[2]
    _write(path, lines)
    res = runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub])
    assert res.exit_code == 1
    assert "line 3 (seq 2): dropped" in res.output


def test_component_log_creates_its_key_once_and_checkpoints_on_close(tmp_path):
    log = audit.open_component_log(tmp_path / "a.jsonl", tmp_path / "keys" / "node.key", component="render-node:n1")
    pub = (tmp_path / "keys" / "node.key.pub").read_text().strip()
    log.append("node.start", actor="system")
    assert log.close().size == 1 and log.close() is None
    again = audit.open_component_log(tmp_path / "a.jsonl", tmp_path / "keys" / "node.key", component="render-node:n1")
    assert audit.public_key_hex(again.public_key) == pub  # the key is reused, not replaced
    again.append("node.stop", actor="system")
    again.close()
    report = audit.verify(tmp_path / "a.jsonl", pub)
    assert report.ok and report.entries == 2 and report.last_checkpoint_size == 2


def test_checkpoints_come_by_count_and_by_time(tmp_path, key):
    by_count = audit.AuditLog(tmp_path / "c.jsonl", key, component="c", checkpoint_every=3, checkpoint_interval_s=0)
    for _ in range(7):
        by_count.append("x", actor="a")
    assert [cp.size for cp in audit.read_checkpoints(by_count.path)] == [3, 6]
    by_time = audit.AuditLog(tmp_path / "t.jsonl", key, component="t", checkpoint_every=0, checkpoint_interval_s=0.2)
    by_time.append("x", actor="a")
    assert audit.read_checkpoints(by_time.path) == []
    time.sleep(0.25)
    by_time.append("x", actor="a")
    assert [cp.size for cp in audit.read_checkpoints(by_time.path)] == [2]


def _append_then_die(path: str, key_path: str, n: int) -> None:
    import os
    import signal

    log = audit.AuditLog(path, audit.load_signing_key(key_path), component="render-node:n1", checkpoint_every=0)
    for i in range(n):
        log.append("job.submit", actor="client:site-a", detail={"i": i})
    os.kill(os.getpid(), signal.SIGKILL)  # no close(): no shutdown checkpoint


def test_start_up_checkpoints_the_size_a_killed_run_ended_at(tmp_path, key):
    """A writer killed before it checkpointed leaves an uncovered tail; the next start signs a checkpoint over it."""
    path = tmp_path / "node.jsonl"
    ctx = multiprocessing.get_context("fork")
    for run in range(3):
        p = ctx.Process(target=_append_then_die, args=(str(path), str(tmp_path / "keys" / "site.key"), 5))
        p.start()
        p.join(60)
        assert p.exitcode == -9
    assert [cp.size for cp in audit.read_checkpoints(path)] == [5, 10]  # written by the 2nd and 3rd start
    log = audit.AuditLog(path, key, component="render-node:n1")
    assert [cp.size for cp in audit.read_checkpoints(path)] == [5, 10, 15]
    audit.AuditLog(path, key, component="render-node:n1")  # covered already: no repeat
    assert len(audit.read_checkpoints(path)) == 3
    assert log.current_checkpoint().size == 15 and len(audit.read_checkpoints(path)) == 3
    log.append("x", actor="a")
    assert log.current_checkpoint().size == 16  # a reply's checkpoint covers the entry written for it


def test_default_writer_checkpoints_every_100_entries_and_on_a_timer(tmp_path, key):
    log = audit.AuditLog(tmp_path / "d.jsonl", key, component="c", fsync=False)
    for _ in range(250):
        log.append("x", actor="a")
    assert [cp.size for cp in audit.read_checkpoints(log.path)] == [100, 200]
    import threading

    timed = audit.AuditLog(tmp_path / "t.jsonl", key, component="t", checkpoint_every=0, checkpoint_interval_s=0.1)
    stop = threading.Event()
    thread = timed.run_checkpoints(stop)
    timed.append("x", actor="a")
    deadline = time.time() + 10
    while not audit.read_checkpoints(timed.path) and time.time() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    assert [cp.size for cp in audit.read_checkpoints(timed.path)] == [1]  # no append needed to cover the tail


def test_witnessed_checkpoints_catch_a_log_truncated_with_its_checkpoint_file(tmp_path, key):
    """The attack: cut the log's tail and its checkpoint file, then let the writer append again (reusing the cut seqs).
    Checkpoints the witness kept still say which entries are missing."""
    path = tmp_path / "node.jsonl"
    log = _fill(path, key, 12, checkpoint_every=0)
    witness = audit.WitnessStore(tmp_path / "witness")
    assert witness.keep(log.current_checkpoint()) and not witness.keep(log.current_checkpoint())  # kept once
    assert not witness.keep(audit.Checkpoint(size=1, head="0" * 64, ts="t", key_id="../../etc/x", sig=""))
    _write(path, _lines(path)[:7])
    Path(f"{path}.checkpoints").write_text("")
    assert audit.verify(path, key.public_key()).ok  # nothing left on the machine contradicts it
    report = audit.verify(path, key.public_key(), trusted_checkpoints=witness.checkpoints(key.public_key()))
    assert [(p.kind, p.seq) for p in report.problems] == [("truncated", 7)]
    assert "seqs 7..11 missing (5 entries deleted from the end)" in report.problems[0].message

    runner = CliRunner()
    pub = str(tmp_path / "keys" / "site.key.pub")
    res = runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub, "--witness", str(tmp_path / "witness")])
    assert res.exit_code == 1 and "witnessed checkpoint" in res.output and "seqs 7..11 missing" in res.output, res.output

    # The writer appends again: seqs 7..11 are reused and the gap is gone, but the witnessed head no longer matches.
    again = audit.AuditLog(path, key, component="site:alpha", checkpoint_every=0)
    for _ in range(6):
        again.append("job.render", actor="operator:7f3a")
    res = runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub, "--witness", str(tmp_path / "witness")])
    assert res.exit_code == 1 and "line 12 (seq 11): chain_broken" in res.output and "removed and others written" in res.output, res.output
    assert runner.invoke(app, ["audit", "verify", str(path), "--public-key", pub, "--witness", str(tmp_path / "nowhere")]).exit_code == 2
