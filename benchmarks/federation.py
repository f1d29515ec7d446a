"""Federation cost: seconds per round and bytes each site sends per round, for 3 and 10 simulated sites, with and
without SecAgg+. Writes benchmarks/results/federation.json.

Sites hold real photos (../shared/data: people, template portraits as extra people, skimage's astronaut), every
person with federated-training consent in their site's consent ledger, which each site checks (audited) at the
budget query and again before training in every round, as in real use; the model is the tiny embedded one at
64 px, so the seconds measure the federation machinery plus a few tiny DP-SGD steps, not SD-1.5 training. Bytes are what each site's `outbox_audit_mod` recorded: the exact serialized objects
Flower pushes for every message (budget answer, training reply, SecAgg+ stages), summed per site per round.
Seconds per round come from the coordinator's checkpoint times (round k written minus round k-1 written).

    python benchmarks/federation.py [--sites 3 10] [--rounds 2] [--out benchmarks/results/federation.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEGAPORTRAIT_DATA", REPO.parent / "shared" / "data"))


def loose_policy(folder: Path) -> Path:
    """A privacy policy whose budgets no benchmark run reaches (the benchmark measures time and bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "privacy.yaml"
    path.write_text("version: 1\ndelta: 1.0e-5\naccountant: rdp\nbudgets:\n  per_photo: 1000.0\n"
                    "  per_person: 1000.0\n  per_site: 1000.0\n")
    return path


def make_sites(root: Path, n: int) -> Path:
    """`n` site folders: site k holds template portrait k (as one person), and the first sites also Obama,
    Biden and the astronaut, so every site has at least one real face."""
    import skimage.data
    from PIL import Image

    templates = sorted((DATA / "templates").glob("*.jpg"))
    extras = [("obama", sorted((DATA / "people" / "obama").glob("*.jpg"))),
              ("biden", sorted((DATA / "people" / "biden").glob("*.jpg")))]
    for k in range(n):
        site = root / f"site-{k:02d}"
        (site / "template").mkdir(parents=True)
        shutil.copy(templates[k % len(templates)], site / "template" / templates[k % len(templates)].name)
        if k < len(extras):
            name, files = extras[k]
            (site / name).mkdir()
            for f in files:
                shutil.copy(f, site / name / f.name)
        if k == len(extras):
            (site / "astronaut").mkdir()
            Image.fromarray(skimage.data.astronaut()).save(site / "astronaut" / "astronaut.png")
    return root


def measure(n_sites: int, secagg: bool, rounds: int, work: Path) -> dict:
    from megaportrait.server.coordinator.checkpoint import load_checkpoint
    from megaportrait.server.coordinator.deployment import simulate

    from megaportrait.client.federation import SiteConsent, record_federated_consent

    case = work / f"{n_sites}-{'secagg' if secagg else 'plain'}"
    sites = make_sites(case / "photos", n_sites)
    for site in sorted(p for p in sites.iterdir() if p.is_dir()):
        record_federated_consent(SiteConsent.in_folder(case / "consent" / site.name), site.name,
                                 sorted(p.name for p in site.iterdir() if p.is_dir()), actor="benchmark")
    result = simulate(sites, case / "coordinator", site_state_dir=case / "sites", consent=case / "consent",
                      run_config={"num-server-rounds": rounds, "secure-aggregation": secagg,
                                  "min-sites": min(2, n_sites), "privacy-policy": str(loose_policy(case))})
    saved = [load_checkpoint(case / "coordinator", round=r).meta["saved_at"] for r in range(rounds + 1)]
    per_round_s = [b - a for a, b in zip(saved, saved[1:])]
    per_site: dict[str, dict[str, int]] = {}
    for outbox in sorted((case / "sites").glob("*/outbox/outbox.jsonl")):
        site = outbox.parent.parent.name
        totals: dict[str, int] = {}
        for line in outbox.read_text().splitlines():
            entry = json.loads(line)
            group = entry["group"].removeprefix("budget-")
            totals[group] = totals.get(group, 0) + int(entry["bytes"])
        per_site[site] = totals
    bytes_round = [v for totals in per_site.values() for k, v in totals.items() if k.isdigit() and int(k) >= 1]
    return {"sites": n_sites, "secure_aggregation": secagg, "rounds": rounds,
            "seconds_per_round": [round(s, 2) for s in per_round_s],
            "mean_seconds_per_round": round(sum(per_round_s) / len(per_round_s), 2),
            "first_round_includes": "face intake (crop cache is cold) and worker start-up",
            "bytes_sent_per_site_per_round": {"mean": round(sum(bytes_round) / len(bytes_round)),
                                              "min": min(bytes_round), "max": max(bytes_round)},
            "bytes_by_site_and_round": per_site, "simulation_wall_s": round(result.seconds, 1),
            "rounds_completed": result.status.get("round")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "federation.json")
    parser.add_argument("--one", nargs=2, metavar=("SITES", "SECAGG"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # one case per process: Ray starts and stops cleanly, memory does not carry over
        print(json.dumps(measure(int(args.one[0]), args.one[1] == "1", args.rounds, args.work)))
        return

    from tqdm import tqdm

    cases = [(n, s) for n in args.sites for s in (False, True)]
    results = []
    with tempfile.TemporaryDirectory(prefix="megaportrait-fedbench-") as tmp:
        for n, secagg in tqdm(cases, desc="federation cases"):
            proc = subprocess.run([sys.executable, __file__, "--one", str(n), "1" if secagg else "0", "--rounds",
                                   str(args.rounds), "--work", tmp], capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"case {n} sites secagg={secagg} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(lines[-1]))
    import torch

    report = {"benchmark": "federation", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "engine": "Flower simulation engine (Ray), tiny embedded SD-shaped UNet, 64 px, LoRA rank 4",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average_at_end": os.getloadavg()},
              "note": "Sites share this machine's CPUs; seconds grow with the number of sites for that reason. "
                      "Bytes per site per round do not depend on the machine.",
              "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for r in results:
        print(f"{r['sites']:>3} sites  secagg={r['secure_aggregation']!s:5}  {r['mean_seconds_per_round']:7.1f} s/round  "
              f"{r['bytes_sent_per_site_per_round']['mean']:>9,} B/site/round")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
