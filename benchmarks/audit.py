"""Audit log throughput: signed appends per second (with fsync) and verification time per 100k entries.

Writes benchmarks/results/audit.json. Verification is timed on `--verify-entries` entries (default 20k, written
without fsync to save time: the bytes are the same) and scaled linearly to 100k, since the verifier does the same
work per entry (hash, Ed25519 verify, chain check). Run: `.venv/bin/python benchmarks/audit.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.progress import track

from megaportrait.shared import audit

RESULTS = Path(__file__).resolve().parent / "results" / "audit.json"


def _append(log: audit.AuditLog, n: int, label: str) -> float:
    t0 = time.perf_counter()
    for i in track(range(n), description=label, transient=True):
        log.append("job.render", actor="operator:3fa2c1", person=f"p-{i % 50:04d}", data=[f"{i:064x}"], policy="ab" * 32,
                   detail={"backend": "classic", "stages": 3})  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--appends", type=int, default=2000, help="fsync'ed, signed appends to time")
    ap.add_argument("--verify-entries", type=int, default=20_000, help="entries to verify (result scaled to 100k)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the logs (default: a temp dir on /tmp)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        key = audit.generate_signing_key(tmp / "bench.key")

        synced = audit.AuditLog(tmp / "synced.jsonl", key, component="bench", checkpoint_every=1000, fsync=True)
        t_sync = _append(synced, args.appends, "appends (fsync)")
        unsynced = audit.AuditLog(tmp / "unsynced.jsonl", key, component="bench", checkpoint_every=1000, fsync=False)
        t_nosync = _append(unsynced, args.appends, "appends (no fsync)")

        big = audit.AuditLog(tmp / "big.jsonl", key, component="bench", checkpoint_every=1000, fsync=False)
        _append(big, args.verify_entries, "writing entries to verify")
        big.checkpoint()
        size_mb = (tmp / "big.jsonl").stat().st_size / 1e6
        t0 = time.perf_counter()
        report = audit.verify(tmp / "big.jsonl", key.public_key())
        t_verify = time.perf_counter() - t0
        assert report.ok and report.entries == args.verify_entries, report.summary()

    per_100k = t_verify * 100_000 / args.verify_entries
    result = {
        "benchmark": "audit",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "appends": args.appends,
        "appends_per_s_fsync_signed": round(args.appends / t_sync, 1),
        "append_ms_fsync_signed": round(1000 * t_sync / args.appends, 3),
        "appends_per_s_signed_no_fsync": round(args.appends / t_nosync, 1),
        "verify_entries_timed": args.verify_entries,
        "verify_s_timed": round(t_verify, 3),
        "verify_entries_per_s": round(args.verify_entries / t_verify, 1),
        "verify_s_per_100k_entries": round(per_100k, 2),
        "verify_per_100k_is_scaled": args.verify_entries != 100_000,
        "log_bytes_per_entry": round(size_mb * 1e6 / args.verify_entries, 1),
        "notes": "Each append: canonical JSON, sha256, Ed25519 sign, write, fsync, under an flock. Verify: sha256 + "
        "Ed25519 verify + chain and checkpoint checks per entry, single thread.",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
