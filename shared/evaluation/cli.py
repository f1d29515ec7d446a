"""`megaportrait eval`: run the evaluation on a folder of people's photos and a folder of templates.

Only typer-level code runs at import; the evaluation is imported inside the command.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _defaults() -> tuple[Optional[Path], Optional[Path], Optional[Path]]:
    from .dataset import default_data_dirs

    found = default_data_dirs()
    if found is None:
        return None, None, None
    people, templates = found
    hard = people.parent / "hard"
    return people, templates, hard if hard.is_dir() else None


def eval_command(
    people: Annotated[Optional[Path], typer.Option("--people", help="Folder of people/<name>/<photo> (default: ../shared/data/people).")] = None,
    templates: Annotated[Optional[Path], typer.Option("--templates", help="Folder of template portraits (default: ../shared/data/templates).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Where eval.json, plots/ and report.html go.")] = Path("runs/eval"),
    extra_faces: Annotated[Optional[Path], typer.Option("--extra-faces", help="More photos whose faces only enlarge the membership-inference pool (default: ../shared/data/hard).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small run (~1 min): 2 photos per person, 2 templates, short adapters.")] = False,
    max_templates: Annotated[Optional[int], typer.Option(help="Use at most this many templates (spread over skin-tone bands).")] = None,
    adapters: Annotated[Optional[int], typer.Option(help="Adapters per privacy arm.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of the positive control's adapters (the DP arm keeps the production steps).")] = None,
    no_privacy: Annotated[bool, typer.Option("--no-privacy", help="Skip the membership-inference part.")] = False,
    base_model: Annotated[Optional[Path], typer.Option("--base-model", help="Base diffusion model (diffusers folder or SD-1.5 single file) for the privacy-utility curve's identity axis: its adapters train on it and render with the diffusion backend. The config's render section (MEGAPORTRAIT_CONFIG / MEGAPORTRAIT_RENDER__*) gives diffusion_base_config, diffusion_params and the device.")] = None,
    diffusion_device: Annotated[Optional[str], typer.Option("--diffusion-device", help="render.diffusion_device for --base-model: auto, cpu, cuda, cuda:1.")] = None,
) -> None:
    """Evaluate identity (by stage), fairness (by skin tone), robustness (degraded photos) and privacy (membership
    inference, DP vs not, and the privacy-utility curve; with --base-model also its identity axis); write JSON,
    plots and an HTML summary."""
    from dataclasses import replace

    from rich.console import Console

    from megaportrait.shared.errors import MegaPortraitError

    from .run import EvalConfig, run_evaluation, write_outputs

    console = Console(stderr=True)
    d_people, d_templates, d_hard = _defaults()
    people, templates = people or d_people, templates or d_templates
    if people is None or templates is None:
        console.print("[red]no data: pass --people DIR and --templates DIR (../shared/data was not found)")
        raise typer.Exit(2)
    if extra_faces is None and people == d_people:
        extra_faces = d_hard
    if diffusion_device is not None and base_model is None:
        console.print("[red]--diffusion-device applies to --base-model's renders; pass --base-model PATH too")
        raise typer.Exit(2)
    if base_model is not None and no_privacy:
        console.print("[red]--base-model gives the privacy-utility curve its identity axis; drop --no-privacy")
        raise typer.Exit(2)
    curve_render = None
    if base_model is not None:
        from megaportrait.shared.config import load_settings

        try:
            loaded = load_settings()
            render, curve_resolution = loaded.render, loaded.identity.resolution
        except MegaPortraitError as exc:
            console.print(f"[red]settings unreadable ({exc.reason}): {exc}")
            raise typer.Exit(2) from exc
        update: dict = {"diffusion_base_model": base_model}
        if diffusion_device is not None:
            update["diffusion_device"] = diffusion_device
        curve_render = render.model_copy(update=update)
    make = EvalConfig.quick_config if quick else EvalConfig
    config = make(people_dir=people, templates_dir=templates, out_dir=out, extra_faces_dir=extra_faces,
                  privacy=not no_privacy, curve_render=curve_render)
    if curve_render is not None:  # the curve's adapters train at the site's identity.resolution on the real model
        config = replace(config, attack=replace(config.attack, curve_resolution=curve_resolution))
    if max_templates is not None:
        config = replace(config, max_templates=max_templates)
    if adapters is not None:
        config = replace(config, attack=replace(config.attack, adapters=adapters))
    if steps is not None:  # the positive control's steps; the DP arm keeps the production steps
        arms = tuple(replace(a, steps=steps) if a.name == "positive_control" else a for a in config.attack.arms)
        config = replace(config, attack=replace(config.attack, arms=arms))
    try:
        result, examples = run_evaluation(config)
    except MegaPortraitError as exc:
        console.print(f"[red]evaluation failed ({exc.reason}): {exc}")
        raise typer.Exit(1) from exc
    paths = write_outputs(result, examples, out)
    h = result["headline"]
    full = h["full"]
    console.print(f"full renders: TAR {full['tar']:.3f}  FAR {full['far']:.3f}  accuracy {full['accuracy']:.3f} "
                  f"(threshold {h['threshold']})")
    if "privacy" in h:
        console.print(f"privacy audit: {h['privacy']['verdict']}")
        for arm, a in h["privacy"]["arms"].items():
            eps = "n/a (no DP)" if a["epsilon_per_photo"] is None else f"{a['epsilon_per_photo']:.3g}"
            console.print(f"LiRA {arm}: AUC {a['auc']:.3f}  TPR@1%FPR {a['tpr_at_fpr_1pct']:.3f}  epsilon per photo "
                          f"{eps}  within its bound: {a['within_bound']}")
    for name, p in paths.items():
        console.print(f"{name}: {p}")
