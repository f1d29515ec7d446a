"""Diffusion render backend: seconds per portrait (single and batched), per stage, and peak GPU memory.

Two configurations, both with random weights (no SD weights can be obtained offline):
- `cpu_tiny`: the tiny models built in code (`shared.tiny_models`) on the real templates at full size, crop
  resolution 64 and 128, CPU, fp32. Tests the plumbing cost: face analysis, control images, three pipelines.
- `sd15_sized`: SD-1.5-shaped UNet, VAE and CLIP text encoder plus 2 ControlNets (depth, lineart), 512-px crop,
  20 steps per stage, fp16 with attention slicing, on CUDA; records seconds per portrait and
  `torch.cuda.max_memory_allocated`. Without CUDA it records `skipped: no CUDA` and the parameter counts of that
  configuration (built on the meta device, no memory used); `--sd15-cpu-check` then runs the same code path on
  CPU at 64 px / 3 steps to show it works end to end (a plumbing check, not a speed figure).
Writes benchmarks/results/render_diffusion.json. Run: `.venv/bin/python benchmarks/render_diffusion.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "render_diffusion.json"
DATA = Path(os.environ.get("MEGAPORTRAIT_DATA", REPO.parent / "shared" / "data"))

SD15_STEPS = 20
SD15_PARAMS: dict[str, Any] = {
    "resolution": 512,
    "scheduler": "dpm++",
    "identity": {"steps": SD15_STEPS, "strength": 1.0, "controls": ["depth"]},
    "shading": {"steps": SD15_STEPS, "strength": 0.35, "controls": ["depth", "lineart"], "control_scales": [0.6, 0.4]},
    "harmonize": {"steps": SD15_STEPS, "strength": 0.45, "controls": ["lineart"]},
}


def _templates(n: int):
    from megaportrait.shared.imaging import load_image

    paths = sorted((DATA / "templates").glob("*.jpg"))[:n]
    if not paths:
        raise SystemExit(f"no templates under {DATA / 'templates'}")
    return [load_image(p) for p in paths]


def _stage_timer():
    """A progress callback that records when each stage starts and ends."""
    marks: dict[str, list[float]] = {}

    def progress(stage: str, fraction: float) -> None:
        if fraction == 0.0 or fraction == 1.0:
            marks.setdefault(stage, []).append(time.perf_counter())

    return marks, progress


def _random_adapter(unet: Any, base_ref: Any, seed: int = 0) -> Any:
    """An IdentityAdapter with a random rank-4 LoRA in the client's layout for `unet` (left LoRA-free)."""
    from megaportrait.client.identity import attach_lora, detach_lora, lora_state_dict
    from megaportrait.shared.config import IdentitySettings
    from megaportrait.shared.records import IdentityAdapter, PrivacyReport

    settings = IdentitySettings(rank=4, alpha=4.0)
    attach_lora(unet, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.device, p.dtype))
    state = lora_state_dict(unet)
    detach_lora(unet)
    unet.requires_grad_(False)
    return IdentityAdapter(person_ref="0" * 64, token=settings.token, rank=4, alpha=4.0,
                           target_modules=tuple(settings.target_modules), lora_state=state, base_model=base_ref,
                           privacy=PrivacyReport(None, 1e-5, 0.0, 1.0, 0, 0.0, "rdp"), photo_sha256=())


def _time_renders(backend: Any, adapter: Any, templates: list, params: dict, batch: int,
                  cuda: bool = False) -> dict[str, Any]:
    from megaportrait.server.render.diffusion.backend import RenderRequest
    from megaportrait.shared.records import StageSwitches

    stages = StageSwitches()
    noop = lambda s, f: None  # noqa: E731
    backend.render("warmup", templates[0], adapter, stages=stages, seed=0, params=params, progress=noop)
    singles, per_stage = [], {"identity": [], "shading": [], "harmonize": []}
    fallbacks = 0
    for i, t in enumerate(track(templates, description=f"single renders @{params['resolution']}px", transient=True)):
        marks, progress = _stage_timer()
        t0 = time.perf_counter()
        out = backend.render(f"job-{i}", t, adapter, stages=stages, seed=i, params=params, progress=progress)
        singles.append(time.perf_counter() - t0)
        fallbacks += len(out.metadata["fallbacks"])
        for stage, (start, end) in ((s, m[:2]) for s, m in marks.items()):
            per_stage[stage].append(end - start)
    peak_single = None
    if cuda:
        torch.cuda.synchronize()
        peak_single = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    requests = [RenderRequest(f"batch-{i}", t, seed=i) for i, t in enumerate(templates[:batch])]
    p = dict(params, batch_size=batch)
    t0 = time.perf_counter()
    backend.render_batch(requests, adapter, stages=stages, params=p, progress=noop)
    batched = (time.perf_counter() - t0) / len(requests)
    timings = {
        "portraits": len(singles),
        "seconds_per_portrait_single": {"median": statistics.median(singles), "min": min(singles), "max": max(singles)},
        "seconds_per_portrait_batched": batched,
        "batch_size": len(requests),
        "seconds_per_stage_median": {k: statistics.median(v) for k, v in per_stage.items() if v},
        "fallbacks_taken": fallbacks,
    }
    if cuda:
        torch.cuda.synchronize()
        timings["peak_gpu_memory_gib_single"] = peak_single
        timings["peak_gpu_memory_gib_batched"] = torch.cuda.max_memory_allocated() / 2**30
    return timings


def bench_cpu_tiny(n_templates: int, threads: int) -> dict[str, Any]:
    from megaportrait.server.render.diffusion.backend import DiffusionBackend
    from megaportrait.server.render.diffusion.models import load_models
    from megaportrait.shared.config import RenderSettings

    torch.set_num_threads(threads)
    settings = RenderSettings(diffusion_device="cpu")
    t0 = time.perf_counter()
    models = load_models(settings)
    load_s = time.perf_counter() - t0
    backend = DiffusionBackend(settings, models=models)
    adapter = _random_adapter(models.components["unet"], models.base_model)
    templates = _templates(n_templates)
    out: dict[str, Any] = {"device": "cpu", "dtype": "float32", "torch_threads": threads, "model_load_seconds": load_s,
                           "template_size": list(templates[0].pixels.shape[:2]), "steps_per_stage": 10}
    for res in (64, 128):
        params = {"resolution": res, "identity": {"steps": 10}, "shading": {"steps": 10},
                  "harmonize": {"steps": 10}}
        out[f"resolution_{res}"] = _time_renders(backend, adapter, templates, params, batch=4)
    return out


def _sd15_components(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """SD 1.5-shaped components with seeded random weights (the tokenizer is the tiny one: ids fit CLIP's vocab)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from megaportrait.shared.base_models import sd15_sized_unet
    from megaportrait.shared.tiny_models import tiny_scheduler, tiny_tokenizer

    unet = sd15_sized_unet(0, dtype=dtype, device=device) if str(device) != "meta" else None
    if unet is None:
        from diffusers import UNet2DConditionModel

        from megaportrait.shared.base_models import SD15_UNET_CONFIG

        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512)
    tok = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, hidden_act="quick_gelu"))
    comps = {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok, "scheduler": tiny_scheduler("ddim")}
    if str(device) != "meta":
        for k in ("unet", "vae", "text_encoder"):
            comps[k] = comps[k].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return comps


def _sd15_controlnets(unet: Any, names: tuple[str, ...], device: Any, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import ControlNetModel

    nets = {}
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        net = ControlNetModel.from_unet(unet)
        nets[name] = net if str(device) == "meta" else net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return nets


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_sd15(force_cpu: bool, resolution: int, steps: int, attention_slicing: bool | None = None) -> dict[str, Any]:
    """SD-1.5-sized render timing; `attention_slicing` None keeps the node's default setting."""
    names = ("depth", "lineart")
    config = {"resolution": resolution, "steps_per_stage": steps, "controlnets": list(names),
              "stage_controls": {s: SD15_PARAMS[s]["controls"] for s in ("identity", "shading", "harmonize")},
              "weights": "random (seeded)"}
    if not torch.cuda.is_available() and not force_cpu:
        with torch.device("meta"):
            comps = _sd15_components("meta", torch.float32)
            nets = _sd15_controlnets(comps["unet"], names, "meta", torch.float32)
        counts = {k: _count(comps[k]) for k in ("unet", "vae", "text_encoder")}
        counts.update({f"controlnet_{k}": _count(v) for k, v in nets.items()})
        return {"skipped": "no CUDA", **config, "parameter_counts": counts,
                "fp16_weights_gib": sum(counts.values()) * 2 / 2**30}

    from megaportrait.server.render.diffusion.backend import DiffusionBackend
    from megaportrait.server.render.diffusion.models import DiffusionModels
    from megaportrait.shared.base_models import unet_sha256
    from megaportrait.shared.config import RenderSettings
    from megaportrait.shared.records import BaseModelRef

    device = torch.device("cpu" if force_cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    settings = RenderSettings(diffusion_device=device.type)
    if attention_slicing is not None:
        settings = settings.model_copy(update={"diffusion_attention_slicing": attention_slicing})
    t0 = time.perf_counter()
    comps = _sd15_components(device, dtype)
    nets = _sd15_controlnets(comps["unet"], names, device, dtype)
    ref = BaseModelRef(name="sd15-sized-random", sha256=unet_sha256(comps["unet"]), kind="diffusers-dir")
    models = DiffusionModels(components=comps, base_model=ref, device=device, dtype=dtype,
                             attention_slicing=settings.diffusion_attention_slicing,
                             vae_slicing=settings.diffusion_vae_slicing, controlnets=nets,
                             sources={k: "random sd15-sized" for k in nets})
    build_s = time.perf_counter() - t0
    adapter = _random_adapter(comps["unet"], ref)
    backend = DiffusionBackend(settings, models=models)
    params = json.loads(json.dumps(SD15_PARAMS))
    params["resolution"] = resolution
    for s in ("identity", "shading", "harmonize"):
        params[s]["steps"] = steps
    templates = _templates(4 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = _time_renders(backend, adapter, templates, params, batch=len(templates), cuda=device.type == "cuda")
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return {**config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "attention_slicing": settings.diffusion_attention_slicing and device.type == "cuda",
            "vae_slicing": settings.diffusion_vae_slicing and device.type == "cuda",
            "build_seconds": build_s, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--templates", type=int, default=6, help="real templates to render in the CPU tiny run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tiny run")
    ap.add_argument("--sd15-cpu-check", action="store_true",
                    help="also run the SD-1.5-sized path on CPU (fp32, 64 px, 3 steps) to check it end to end "
                         "(~3 min, 8 GiB RAM); recorded apart, not a GPU figure")
    ap.add_argument("--sd15-resolution", type=int, default=512)
    ap.add_argument("--sd15-steps", type=int, default=SD15_STEPS)
    ap.add_argument("--sd15-only", action="store_true",
                    help="run only the SD-1.5-sized configuration (with and without attention slicing) and keep the "
                         "other entries of the results file as they are: for a GPU run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.sd15_only:
        result = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "render_diffusion"}
        result.pop("sd15_sized_no_attention_slicing", None)
        result["sd15_sized"] = bench_sd15(False, args.sd15_resolution, args.sd15_steps)
        if torch.cuda.is_available():
            result["sd15_sized_attention_slicing"] = bench_sd15(False, args.sd15_resolution, args.sd15_steps,
                                                                attention_slicing=True)
        result["sd15_machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                                  "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in result if k.startswith("sd15")}, indent=2))
        return

    result = {
        "benchmark": "render_diffusion",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "load_average_1min_at_start": os.getloadavg()[0]},
        "note": "random weights throughout: timings and memory only, not image quality",
        "cpu_tiny": bench_cpu_tiny(args.templates, args.threads),
        "sd15_sized": bench_sd15(False, args.sd15_resolution, args.sd15_steps),
    }
    result["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    if args.sd15_cpu_check:
        result["sd15_sized_cpu_path_check"] = bench_sd15(True, 64, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
