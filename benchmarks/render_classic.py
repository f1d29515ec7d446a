"""Classic (CPU) render backend: seconds per portrait at 512 and 1024 px on one CPU core, per stage, and peak memory.

The process is pinned to one core (sched_setaffinity), OpenCV runs single-threaded (cv2.setNumThreads(1)) and
OMP/BLAS pools get one thread. Templates are the 10 real portraits resized so their long side is 512 or 1024 px;
the identity payload is Obama's intake crops (512 px). Each size: one warm-up render, then one render per template.
"Seconds per portrait" is the whole `ClassicBackend.render` call, including template face analysis and the
metadata scoring of the output (detection, mesh, SFace); `render_only_s` leaves that scoring out. Wall time counts
time the pinned core spent on other processes (the machine is shared): `cpu_seconds_per_portrait_mean` (this
process's CPU time per render) and the load average show how much that was.
Peak memory: the process's peak resident set (models included) and the tracemalloc peak of one render's Python/NumPy
allocations. Writes benchmarks/results/render_classic.json. Run: `.venv/bin/python benchmarks/render_classic.py`.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
from rich.progress import track  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "render_classic.json"
DATA = Path(os.environ.get("MEGAPORTRAIT_DATA", REPO.parent / "shared" / "data"))
SIZES = (512, 1024)


def _resized(image, long_side: int):
    from megaportrait.shared.records import SourceImage

    h, w = image.pixels.shape[:2]
    scale = long_side / max(h, w)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    px = cv2.resize(image.pixels, (round(w * scale), round(h * scale)), interpolation=interp)
    return SourceImage.from_array(px, origin=f"{image.origin}@{long_side}")


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    from megaportrait.client.faces import face_crop_set, intake_photos
    from megaportrait.server.render.classic import ClassicBackend
    from megaportrait.shared.config import FaceSettings
    from megaportrait.shared.face_analysis import FaceAnalyzer
    from megaportrait.shared.imaging import load_image
    from megaportrait.shared.records import StageSwitches

    analyzer = FaceAnalyzer()
    photos = sorted((DATA / "people" / "obama").glob("*.jpg"))
    templates = [load_image(p) for p in sorted((DATA / "templates").glob("*.jpg"))]
    if not photos or not templates:
        raise SystemExit(f"no photos/templates under {DATA}")
    payload = face_crop_set("obama", intake_photos(photos, FaceSettings(crop_size=512), analyzer, show_progress=False))
    backend = ClassicBackend(analyzer)
    results: dict = {}
    for size in SIZES:
        scaled = [_resized(t, size) for t in templates]
        backend.render("warmup", scaled[0], payload, stages=StageSwitches(), seed=0, params={},
                       progress=lambda s, f: None)
        totals, cpu, render_only, stages, sigmas = [], [], [], {}, []
        for i, template in enumerate(track(scaled, description=f"classic render {size}px")):
            t0, c0 = time.perf_counter(), time.process_time()
            portrait = backend.render(f"bench-{size}-{i}", template, payload, stages=StageSwitches(), seed=0,
                                      params={}, progress=lambda s, f: None)
            totals.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            sigmas.append(portrait.metadata["shading"]["sigma"])
            secs = portrait.metadata["seconds"]
            render_only.append(totals[-1] - secs["score"])
            for k, v in secs.items():
                stages.setdefault(k, []).append(v)
        tracemalloc.start()
        backend.render("mem", scaled[0], payload, stages=StageSwitches(), seed=0, params={}, progress=lambda s, f: None)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results[f"{size}px"] = {
            "template_size": list(scaled[0].pixels.shape[:2]),
            "portraits": len(scaled),
            "seconds_per_portrait_mean": round(statistics.mean(totals), 4),
            "seconds_per_portrait_median": round(statistics.median(totals), 4),
            "seconds_per_portrait_max": round(max(totals), 4),
            "cpu_seconds_per_portrait_mean": round(statistics.mean(cpu), 4),
            "render_only_s_mean": round(statistics.mean(render_only), 4),
            "shading_sigma_chosen": sorted(sigmas),
            "stage_seconds_mean": {k: round(statistics.mean(v), 4) for k, v in stages.items()},
            "traced_peak_mib_one_render": round(traced_peak / 2**20, 1),
            "under_1s_target": statistics.mean(totals) < 1.0,
        }
    out = {
        "benchmark": "render_classic",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "cv2_threads": cv2.getNumThreads(), "opencv": cv2.__version__},
        "payload": {"person": "obama", "crops": len(payload.crops), "crop_size": 512},
        "results": results,
        "peak_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "target": "under 1 s per portrait at 1024 px on one CPU core",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
