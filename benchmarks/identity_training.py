"""Identity Net training speed with and without Opacus DP; writes benchmarks/results/identity_training.json.

    python benchmarks/identity_training.py                 # tiny embedded model, 64 px, CPU
    python benchmarks/identity_training.py --unet sd15     # SD-1.5-sized UNet (random weights), 512 px, CUDA

Each configuration runs in its own subprocess so that its peak memory is its own: peak host memory is
`resource.getrusage(RUSAGE_SELF).ru_maxrss` of that subprocess (resident set, includes the Python interpreter and
libraries), and on CUDA also `torch.cuda.max_memory_allocated`. Speed is the marginal cost of a step (blocks of
N and 2N steps, the fastest of several blocks each, differenced: the fixed cost per training call is reported
apart), both as wall-clock steps/s and as CPU seconds per step
(`time.process_time`), because on a shared machine the wall clock also measures the neighbours. The DP overhead ratio
is DP time per step / plain time per step (target <= 1.5, judged on CPU time on CPU and on wall time on CUDA). `--modes` compares Opacus' per-sample-gradient modes ("ew" is the default in IdentitySettings).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "identity_training.json"


def _one_run(unet_kind: str, dp: bool, steps: int, warmup: int, threads: int, grad_sample_mode: str,
             repeats: int) -> dict:
    """Train in this process and return its measurements."""
    import numpy as np
    import torch
    from megaportrait.client import identity
    from megaportrait.shared.base_models import load_base_model, sd15_sized_unet
    from megaportrait.shared.config import IdentitySettings

    torch.set_num_threads(threads)
    cuda = unet_kind == "sd15"
    device = "cuda" if cuda else "cpu"
    resolution = 512 if cuda else 64
    settings = IdentitySettings(dp_enabled=dp, steps=steps, resolution=resolution, batch_size=4, noise_multiplier=1.0,
                                grad_sample_mode=grad_sample_mode)
    base = load_base_model(None)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(8)]
    ts = identity.prepare_training_set(base.components, crops, settings)
    components = dict(base.components)
    if cuda:
        # SD 1.5's UNet shape with random weights; the latents and text states are stand-ins of SD's shapes.
        components["unet"] = sd15_sized_unet(dtype=torch.float32, device=device)
        n = len(crops)
        ts.moments = torch.randn(n, 2, 8, resolution // 8, resolution // 8)
        ts.prompt_embeds = torch.randn(2, 77, 768)
    unet = identity.attach_lora(components["unet"], settings)
    lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)

    def timed(n: int) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        identity.train_lora(components, ts, settings, steps=n, progress=False, dp_noise_seed=0 if dp else None)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    timed(warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Timed blocks of `steps` and `2 * steps`; the per-step cost is the difference over `steps`, which leaves out
    # the fixed cost of a call (Opacus wrapping, the accountant's epsilon), reported separately. The fastest of
    # `repeats` blocks counts, being the least disturbed by other processes.
    short = [timed(steps) for _ in range(repeats)]
    long = [timed(2 * steps) for _ in range(repeats)]
    wall = min(b[0] for b in long) - min(b[0] for b in short)
    cpu = min(b[1] for b in long) - min(b[1] for b in short)
    out = {
        "dp": dp, "steps_per_block": steps, "blocks": repeats, "batch_size": settings.batch_size,
        "resolution": resolution, "lora_parameters": lora_params, "grad_sample_mode": grad_sample_mode if dp else None,
        "steps_per_s": steps / wall, "wall_s_per_step": wall / steps, "cpu_s_per_step": cpu / steps,
        "fixed_cpu_s_per_call": min(b[1] for b in short) - cpu,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per configuration; the fastest counts")
    parser.add_argument("--modes", default="ew,hooks", help="comma-separated Opacus grad_sample modes to compare")
    parser.add_argument("--one", choices=["dp", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ew", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (20 if args.unet == "tiny" else 10)

    if args.one:
        print(json.dumps(_one_run(args.unet, args.one == "dp", steps, warmup=3, threads=args.threads,
                                  grad_sample_mode=args.mode, repeats=args.repeats)))
        return

    import torch

    record: dict = {
        "benchmark": "identity_training", "unet": args.unet, "host": platform.node(), "cpu": platform.processor(),
        "torch_threads": args.threads, "memory_measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss of a subprocess "
        "per configuration (peak resident set, interpreter and libraries included)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.unet == "sd15" and not torch.cuda.is_available():
        record["skipped"] = "CUDA not available: the SD-1.5-sized UNet at 512 px is timed on GPU only"
    else:
        common = ["--unet", args.unet, "--steps", str(steps), "--threads", str(args.threads),
                  "--repeats", str(args.repeats)]
        plain = _spawn([*common, "--one", "plain"])
        record["plain"] = plain
        record["dp"] = {}
        for mode in args.modes.split(","):
            dp = _spawn([*common, "--one", "dp", "--mode", mode])
            if "error" not in dp and "error" not in plain:
                dp["overhead_wall"] = dp["wall_s_per_step"] / plain["wall_s_per_step"]
                dp["overhead_cpu"] = dp["cpu_s_per_step"] / plain["cpu_s_per_step"]
                # On CPU, CPU time is the judge (on a shared host the wall clock also counts other processes); on
                # CUDA the host CPU mostly waits for the GPU, so the wall clock is.
                judged = "overhead_wall" if args.unet == "sd15" else "overhead_cpu"
                dp["overhead_judged_on"] = judged
                dp["meets_1_5x_target"] = dp[judged] <= 1.5
            record["dp"][mode] = dp
    # One file, one entry per UNet size: a GPU run adds "sd15" beside the CPU "tiny" figures.
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.unet] = record
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
