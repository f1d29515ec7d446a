"""`megaportrait demo`: the end-to-end demo. Only typer-level code runs at import; the demo loads inside."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def quiet_libraries() -> None:
    """Keep the terminal to the progress bars: libraries' info chatter and known-harmless warnings are not shown
    (`--verbose` shows everything). Environment settings reach the native libraries loaded after this."""
    import logging
    import os
    import warnings

    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus|diffusers|transformers|mediapipe|torch")


def demo_command(
    photos: Annotated[Optional[Path], typer.Option("--photos", help="Your own people: a folder with one sub-folder of photos per person (or one person's photos); they join site-a.")] = None,
    template: Annotated[Optional[Path], typer.Option("--template", help="Your own template portrait to render onto (replaces the template set).")] = None,
    out: Annotated[Path, typer.Option("--out", help="The run goes into OUT/<UTC timestamp>/ (report.html, demo.json, work/).")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Shortened run: one person per site, one round, two templates.")] = False,
    sites: Annotated[Optional[int], typer.Option("--sites", min=2, help="Number of simulated sites [3].")] = None,
    people_per_site: Annotated[Optional[int], typer.Option("--people-per-site", min=1, help="People per site [2].")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Federated rounds [2].")] = None,
    templates: Annotated[Optional[int], typer.Option("--templates", min=1, help="Templates rendered onto [4].")] = None,
    adapter_steps: Annotated[Optional[int], typer.Option("--adapter-steps", min=1, help="DP-SGD steps per personal adapter [30].")] = None,
    revoke: Annotated[Optional[str], typer.Option("--revoke", help="Whose consent to revoke (a person's name) [first person at site-b].")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="The shared photo set (people/, templates/, hard/) [$MEGAPORTRAIT_DATA or ../shared/data].")] = None,
    no_ablations: Annotated[bool, typer.Option("--no-ablations", help="Render the full pipeline only.")] = False,
    no_diffusion: Annotated[bool, typer.Option("--no-diffusion", help="Skip the tiny-model diffusion render.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step (INFO).")] = False,
) -> None:
    """Run the whole system end to end on embedded defaults and write an HTML report: federated DP training across
    simulated sites, personal adapters, sealed payloads to a loopback mTLS render node, portraits with ablations,
    one consent revocation, verified audit logs."""
    from rich.console import Console

    from megaportrait.shared.errors import MegaPortraitError
    from megaportrait.shared.logs import configure_logging

    from .run import run_demo
    from .settings import DemoSettings

    configure_logging("INFO" if verbose else "WARNING")
    if not verbose:
        quiet_libraries()
    else:
        from megaportrait.shared.logs import show_third_party

        show_third_party()
    console = Console(stderr=True)
    overrides = {k: v for k, v in dict(photos_dir=photos, template=template, n_sites=sites,
                                        people_per_site=people_per_site, rounds=rounds, n_templates=templates,
                                        adapter_steps=adapter_steps, revoke=revoke, data_dir=data).items()
                 if v is not None}
    if no_ablations:
        overrides["ablations"] = False
    if no_diffusion:
        overrides["diffusion"] = False
    try:
        settings = (DemoSettings.quick_settings(out, **overrides) if quick else DemoSettings(out_dir=out, **overrides))
        outcome = run_demo(settings, console=console, quiet=not verbose)
    except MegaPortraitError as exc:
        console.print(f"[red]demo failed ({exc.reason}): {exc}")
        raise typer.Exit(1) from exc
    s = outcome.summary
    rv = s["revocation"]
    console.print(f"[green]done in {s['seconds']['total']:.0f} s[/]: {len(s['renders'])} render job(s); revocation of "
                  f"{rv['person']} {'checked' if rv['ok'] else '[red]INCOMPLETE[/]'}; audit logs "
                  f"{'verified' if all(a['ok'] for a in s['audit']) else '[red]FAILED verification[/]'}")
    def eps(x) -> str:
        return "inf (no noise)" if x is None else f"{x:.3g}"

    for site in s["privacy"]:  # after every training run on the site's photos, from the site's own ledger
        console.print(f"{site['site']}: epsilon per photo {eps(site['per_photo'])}, per person "
                      f"{eps(site['per_person'])} (global adapter), per site {eps(site['per_site'])} "
                      f"(delta {site['delta']:g}, Opacus {site['accountant']})")
    typer.echo(str(outcome.report))
