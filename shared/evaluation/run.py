"""The whole evaluation: identity by stage, fairness by skin tone, robustness to bad photos, membership inference.

`run_evaluation(config)` returns a JSON-ready dict (and example renders for the report); `write_outputs` writes
`eval.json`, `plots/*.png` and `report.html` into `config.out_dir`. Progress is shown with rich.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from megaportrait.shared.config import FaceSettings, RenderSettings
from megaportrait.shared.face_analysis import SFACE_THRESHOLD, FaceAnalyzer
from megaportrait.shared.report import json_default

from .dataset import EvaluationError, find_folders, prepare_data, spread_over_bands
from .identity import ABLATIONS, run_ablation, summarise
from .lira import ArmSettings, IdentityProbe, LiraSettings, run_lira_audit
from .privacy import face_pool, photos_in
from .robustness import DEGRADATIONS, Degradation, run_robustness, summarise_robustness

log = logging.getLogger("megaportrait.evaluation")

JSON_NAME = "eval.json"
REPORT_NAME = "report.html"


QUICK_AUDIT = LiraSettings(adapters=6, pool_size=8, photos_per_adapter=2, draws=8, bootstrap=100, canaries=8,
                           arms=(ArmSettings("positive_control", 150, 1e-2, None),
                                 ArmSettings("production_dp", 10, 1e-3, 1.0)),
                           curve_noise=(None, 1.0), curve_steps=5)
"""The privacy audit of `EvalConfig.quick_config`: too small for the positive control to reach its bar, so its
report is expected to say the audit has no power."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how much of it.

    people_dir: people/<name>/<photo>; templates_dir: template portraits; out_dir: where results go.
    extra_faces_dir: more photos whose faces only enlarge the privacy audit's pool (any faces, none refused).
    max_templates / max_photos_per_person: subsets (None = all); templates are spread over skin-tone bands.
    robustness_templates / robustness_photos_per_person: the subset used for the degraded-photo renders.
    curve_render: the render section whose diffusion settings (`diffusion_base_model`, `diffusion_base_config`,
        `diffusion_device`, `diffusion_params`) give the privacy-utility curve its identity axis: its adapters
        train on that base model and render with the diffusion backend. None (or no `diffusion_base_model`) = no
        identity axis. The models load in float32 whatever `diffusion_fp16` says, since the adapters train on them.
    torch_threads: torch's CPU threads during the run. 1 by default: with OpenCV loaded, torch's OpenMP pool at 2+
        threads on a busy 2-core machine was measured 30-40x slower per UNet forward (competing OpenMP runtimes).
    """

    people_dir: Path
    templates_dir: Path
    out_dir: Path
    extra_faces_dir: Path | None = None
    max_templates: int | None = None
    max_photos_per_person: int | None = None
    stages: tuple[str, ...] = tuple(ABLATIONS)
    robustness_templates: int = 2
    robustness_photos_per_person: int | None = None
    degradations: tuple[Degradation, ...] = DEGRADATIONS
    attack: LiraSettings = field(default_factory=LiraSettings)
    privacy: bool = True
    curve_render: RenderSettings | None = None
    torch_threads: int = 1
    quick: bool = False

    @classmethod
    def quick_config(cls, people_dir: Path, templates_dir: Path, out_dir: Path, **overrides) -> "EvalConfig":
        """A small run for tests and smoke checks (about a minute on 2 cores): 2 photos per person, 2 templates,
        1 photo per person and 1 template for robustness, a small privacy audit (6 adapters per arm)."""
        base = dict(people_dir=Path(people_dir), templates_dir=Path(templates_dir), out_dir=Path(out_dir),
                    max_templates=2, max_photos_per_person=2, robustness_templates=1,
                    robustness_photos_per_person=1, attack=QUICK_AUDIT, quick=True)
        base.update(overrides)
        return cls(**base)


def _json_config(config: EvalConfig) -> dict:
    out = asdict(config)
    if config.curve_render is not None:
        out["curve_render"] = config.curve_render.model_dump(mode="json")
    else:
        out.pop("curve_render")  # no identity axis: eval.json's config as before the option existed
    out["degradations"] = [{"kind": d.kind, "unit": d.unit, "levels": list(d.levels)} for d in config.degradations]
    return json.loads(json.dumps(out, default=str))


def run_evaluation(config: EvalConfig, *, backend=None, analyzer: FaceAnalyzer | None = None,
                   show_progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Run every part of the evaluation; returns (results, example images by caption).

    backend: a `RenderBackend` taking a FaceCropSet (default: the classic backend sharing `analyzer`).
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    unknown = [s for s in config.stages if s not in ABLATIONS]
    if unknown:
        raise EvaluationError(f"unknown stage setting(s) {unknown}; choose from {list(ABLATIONS)}")
    if "full" not in config.stages:
        raise EvaluationError("the stage list must include 'full' (fairness and robustness are judged on full renders)")
    started = time.time()
    settings = FaceSettings()
    analyzer = analyzer or FaceAnalyzer(settings)
    curve_models = load_curve_models(config)  # before any work: a missing base model fails at once, named
    if backend is None:
        from megaportrait.server.render.classic import ClassicBackend

        backend = ClassicBackend(analyzer=analyzer)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    timings: dict[str, float] = {}
    folders = find_folders(config.people_dir, config.templates_dir)
    if config.max_photos_per_person is not None:
        folders = replace(folders, people={k: v[: config.max_photos_per_person] for k, v in folders.people.items()})
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, disable=not show_progress) as progress:
            t = time.time()
            n_items = sum(len(v) for v in folders.people.values()) + len(folders.templates)
            task = progress.add_task("checking photos, templates", total=n_items)
            data = prepare_data(folders, analyzer, settings, max_templates=config.max_templates,
                                progress=lambda n: progress.advance(task, n))
            timings["prepare"] = time.time() - t

            t = time.time()
            stages = {s: ABLATIONS[s] for s in config.stages}
            n_renders = sum(len(p.accepted) for p in data.people) * len(data.templates) * len(stages)
            task = progress.add_task("identity: stage ablation", total=n_renders)
            example_key = (data.people[0].name, data.templates[0].name)
            scores, examples = run_ablation(backend, analyzer, data, stages, keep_example=example_key,
                                            advance=lambda: progress.advance(task))
            timings["identity"] = time.time() - t

            t = time.time()
            rob_templates = spread_over_bands(data.templates, config.robustness_templates)
            n_photos = sum(len(p.accepted) if config.robustness_photos_per_person is None
                           else min(len(p.accepted), config.robustness_photos_per_person) for p in data.people)
            n_levels = sum(len(d.levels) for d in config.degradations)
            task = progress.add_task("robustness: degraded photos", total=n_photos * n_levels * len(rob_templates))
            cases = run_robustness(backend, analyzer, data, rob_templates, scores, settings,
                                   degradations=config.degradations,
                                   photos_per_person=config.robustness_photos_per_person,
                                   advance=lambda n: progress.advance(task, n))
            timings["robustness"] = time.time() - t

            privacy = None
            if config.privacy:
                t = time.time()
                dirs = [config.templates_dir]
                if config.extra_faces_dir is not None:
                    dirs.append(config.extra_faces_dir)
                size = config.attack.resolution
                crops, labels = face_pool(photos_in(dirs), analyzer, size=size)
                # People's crops also feed the curve, whose adapters may train larger (`curve_resolution`); training
                # resizes every crop to its own resolution.
                person_size = max(size, config.attack.curve_resolution or size)
                pools = {p.name: face_pool(photos_in([config.people_dir / p.name]), analyzer, size=person_size)
                         for p in data.people}
                people = {name: pool[0] for name, pool in pools.items()}
                probe = None
                if curve_models is not None:
                    from megaportrait.server.render.diffusion import DiffusionBackend

                    probe = IdentityProbe(
                        backend=DiffusionBackend(config.curve_render, models=curve_models, analyzer=analyzer),
                        template=data.templates[0].image, template_name=data.templates[0].name,
                        references=held_out_references(config.people_dir, pools, analyzer))
                task = progress.add_task("privacy: LiRA adapters (steps)",
                                         total=config.attack.adapters * sum(a.steps for a in config.attack.arms))
                privacy = run_lira_audit(crops, people, config.attack, advance=lambda n: progress.advance(task, n),
                                         probe=probe)
                privacy["pool"] = labels[: config.attack.pool_size]
                timings["privacy"] = time.time() - t
    finally:
        torch.set_num_threads(threads)

    identity = {
        "threshold": SFACE_THRESHOLD,
        "embedder": data.embedder,
        "protocol": "leave one photo out: each accepted photo is the payload; genuine pairs are the render vs each "
                    "of the person's other photos, impostor pairs the render vs every photo of the other people",
        "by_stage": {s: summarise([x for x in scores if x.stage == s]) for s in stages},
        "renders": [x.as_dict() for x in scores],
    }
    from .fairness import fairness_report

    result = {
        "meta": {
            "quick": config.quick,
            "config": _json_config(config),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.time() - started, 1)},
            "backend": getattr(backend, "name", type(backend).__name__),
            "embedder": data.embedder,
            "python": platform.python_version(),
            "torch_threads": config.torch_threads,
            "people": {p.name: {"photos_accepted": len(p.accepted), "ita": p.ita, "band": p.band} for p in data.people},
            "templates": {t.name: {"ita": t.ita, "band": t.band} for t in data.templates},
            "robustness_templates": [t.name for t in rob_templates],
            "skipped": data.skipped,
            "fallbacks": _fallback_counts(scores),
        },
        "identity": identity,
        "fairness": fairness_report(scores, data),
        "robustness": {
            "templates": [t.name for t in rob_templates],
            "by_degradation": summarise_robustness(cases, config.degradations),
            "cases": [_case_dict(c) for c in cases],
        },
        "privacy": privacy,
    }
    result["headline"] = headline(result)
    examples_out = {f"template {example_key[1]}" if s == "none" else f"{s}": px for s, px in examples.items()}
    return result, examples_out


def load_curve_models(config: EvalConfig):
    """The curve's diffusion models (`server.render.diffusion.models.load_models`, float32), or None when no base
    model is configured. Raises ModelNotFound naming a missing path."""
    render = config.curve_render
    if render is None or render.diffusion_base_model is None:
        return None
    from megaportrait.server.render.diffusion.models import load_models

    return load_models(render.model_copy(update={"diffusion_fp16": False}))


def held_out_references(people_dir: Path, pools: dict[str, tuple[list, list[str]]], analyzer: FaceAnalyzer,
                        ) -> dict[str, np.ndarray]:
    """Per person with 2+ crops, the SFace embedding of the face their last crop (the curve's held-out one) came
    from, computed on the original photo (`face_pool` labels crops "<file>#<face index>")."""
    from megaportrait.shared.imaging import load_image

    refs = {}
    for name, (crops, labels) in pools.items():
        if len(crops) < 2:
            continue
        file, index = labels[-1].rsplit("#", 1)
        path = next(p for p in photos_in([people_dir / name]) if p.name == file)
        image = load_image(path)
        face = analyzer.embed(image, analyzer.detect(image)[int(index)])
        if face.embedding is None:
            raise EvaluationError(f"no SFace embedding for {name}'s held-out photo {file}: the curve's identity "
                                  "axis has nothing to compare its render with")
        refs[name] = face.embedding
    return refs


def _fallback_counts(scores) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in scores:
        for f in s.fallbacks:
            counts[f] = counts.get(f, 0) + 1
    return counts


def _case_dict(case) -> dict:
    return {"person": case.person, "photo": case.photo, "kind": case.kind, "level": case.level,
            "severity": case.severity, "refused": case.refused, "refusal_detail": case.refusal_detail,
            "flags": list(case.flags), "identity": [s.identity for s in case.scores],
            "clean_identity": list(case.clean_identity), "drops": case.drops()}


def headline(result: dict) -> dict:
    """The few numbers a closing note quotes."""
    by_stage = result["identity"]["by_stage"]
    full = by_stage["full"]
    out = {
        "threshold": result["identity"]["threshold"],
        "full": {k: full[k] for k in ("tar", "far", "accuracy", "mean_genuine", "mean_impostor", "mean_template_leak",
                                      "template_leak_verified_rate", "n_renders")},
        "accuracy_by_stage": {s: v["accuracy"] for s, v in by_stage.items()},
        "tar_by_stage": {s: v["tar"] for s, v in by_stage.items()},
        "mean_genuine_by_stage": {s: v["mean_genuine"] for s, v in by_stage.items()},
    }
    fair = result["fairness"]
    out["fairness"] = {
        "template_band_gap_mean_identity": (fair["template_band"]["gaps"]["mean_identity"] or {}).get("gap"),
        "template_band_gap_tar": (fair["template_band"]["gaps"]["tar"] or {}).get("gap"),
        "template_band_verdict": fair["template_band"]["verdict"],
        "person_band_verdict": fair["person_band"]["verdict"],
    }
    out["robustness"] = {
        kind: [{"level": r["level"], "refused": f"{r['n_refused']}/{r['n_photos']}", "mean_drop": r["mean_drop"],
                "failure_rate": r["failure_rate"]} for r in v["levels"]]
        for kind, v in result["robustness"]["by_degradation"].items()
    }
    if result["privacy"] is not None:
        priv = result["privacy"]
        out["privacy"] = {"powered": priv["powered"], "verdict": priv["verdict"], "arms": {
            arm: {"auc": a.get("auc"), "auc_ci95": a.get("ci95", {}).get("auc"), "tpr_at_fpr_1pct":
                  a.get("tpr_at_fpr_1pct"), "tpr_at_fpr_0.1pct": a.get("tpr_at_fpr_0.1pct"),
                  "epsilon_per_photo": a.get("epsilon_per_photo"), "within_bound": a.get("within_bound"),
                  "person_level_auc": a.get("person_level", {}).get("auc"),
                  "canary_exposure": a.get("canary", {}).get("exposure_mean")}
            for arm, a in priv["arms"].items()}}
    return out


def write_outputs(result: dict, examples: dict[str, np.ndarray], out_dir: Path) -> dict[str, Path]:
    """Write eval.json, plots/*.png and report.html under `out_dir`; returns their paths by name."""
    from . import plots
    from .summary import write_summary

    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME}
    paths["json"].write_text(json.dumps(result, indent=1, default=json_default), encoding="utf-8")
    paths["identity_plot"] = plots.plot_identity_by_stage(result["identity"]["renders"],
                                                          list(result["identity"]["by_stage"]),
                                                          result["identity"]["threshold"],
                                                          out_dir / "plots" / "identity_by_stage.png")
    paths["fairness_plot"] = plots.plot_fairness(result["fairness"], out_dir / "plots" / "fairness_by_band.png")
    paths["robustness_plot"] = plots.plot_robustness(result["robustness"]["by_degradation"],
                                                     out_dir / "plots" / "robustness.png")
    if result["privacy"] is not None:
        paths["privacy_plot"] = plots.plot_privacy_audit(result["privacy"], out_dir / "plots" / "privacy_audit.png")
    paths["html"] = write_summary(result, examples, paths, out_dir / REPORT_NAME)
    return paths

