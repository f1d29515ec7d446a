"""Full-size privacy audit (shared/evaluation/lira.py): LiRA with 16 adapters per arm, positive control, DP arm
against its epsilon bound, privacy-utility curve. Writes benchmarks/results/eval/privacy_audit.json.

    .venv/bin/python benchmarks/privacy_audit.py [--adapters 16] [--photos-per-adapter 3] [--keep-raw]
        [--out benchmarks/results/eval/privacy_audit.json]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    import torch
    from rich.progress import Progress

    from megaportrait.shared.evaluation.lira import LiraSettings, run_lira_audit
    from megaportrait.shared.evaluation.privacy import face_pool, photos_in
    from megaportrait.shared.face_analysis import FaceAnalyzer

    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--photos-per-adapter", type=int, default=3, help="pool photos per adapter (besides the "
                        "people drawn in and the canary)")
    parser.add_argument("--control-steps", type=int, default=None, help="positive control's steps (default: "
                        "LiraSettings')")
    parser.add_argument("--control-lr", type=float, default=None, help="positive control's learning rate")
    parser.add_argument("--no-calibration", action="store_true", help="LiRA without the per-adapter offset")
    parser.add_argument("--keep-raw", action="store_true", help="store every adapter's losses in the JSON")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval/privacy_audit.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    analyzer = FaceAnalyzer()
    pool, labels = face_pool(photos_in([args.data / "hard", args.data / "templates"]), analyzer, size=64)
    people = {p.name: face_pool(photos_in([p]), analyzer, size=64)[0] for p in sorted((args.data / "people").iterdir())
              if p.is_dir()}
    lira = LiraSettings(adapters=args.adapters, workers=args.workers, photos_per_adapter=args.photos_per_adapter,
                        adapter_calibration=not args.no_calibration, keep_raw=args.keep_raw)
    control = next(a for a in lira.arms if a.name == "positive_control")
    control = replace(control, steps=args.control_steps or control.steps, learning_rate=args.control_lr or
                      control.learning_rate)
    lira = replace(lira, arms=tuple(control if a.name == control.name else a for a in lira.arms))
    started = time.time()
    with Progress() as progress:
        task = progress.add_task("LiRA adapters (steps)", total=lira.adapters * sum(a.steps for a in lira.arms))
        result = run_lira_audit(pool, people, lira, advance=lambda n: progress.advance(task, n))
    result["seconds"] = round(time.time() - started, 1)
    result["pool"] = labels[: lira.pool_size]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(result["verdict"])
    for name, arm in result["arms"].items():
        print(f"{name}: AUC {arm['auc']:.3f} {arm['ci95'].get('auc')}, TPR@1% {arm['tpr_at_fpr_1pct']:.3f}, "
              f"TPR@0.1% {arm['tpr_at_fpr_0.1pct']:.3f}, epsilon {arm['epsilon_per_photo']}")


if __name__ == "__main__":
    main()
