"""Checkpoints of the global adapter, one per aggregated round, and resuming from the latest.

Layout under the coordinator's state folder:

    checkpoints/round-0000.npz   the initial adapter (round 0), then one file per aggregated round
    checkpoints/latest.json      {"round": n, "file": "round-000n.npz", ...}: written last, atomically

A checkpoint holds the adapter arrays (float32, in the Identity Net's LoRA parameter order), their names, the base
model hash and the sites that took part. A crash between two writes leaves `latest.json` pointing at the previous
complete round, which is where a restarted coordinator resumes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megaportrait.shared.errors import MegaPortraitError

LATEST = "latest.json"


class CheckpointError(MegaPortraitError):
    """A checkpoint on disk is unreadable or belongs to a different adapter/base model."""

    reason = "checkpoint_invalid"


@dataclass(frozen=True)
class Checkpoint:
    """The global adapter after `round` aggregated rounds (round 0: the initial adapter)."""

    round: int
    arrays: list[np.ndarray]
    names: list[str]
    base_model_sha256: str
    sites: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "checkpoints"


def save_checkpoint(state_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` and then point `latest.json` at it (both atomically); returns the array file."""
    if len(ckpt.arrays) != len(ckpt.names):
        raise CheckpointError(f"{len(ckpt.arrays)} arrays but {len(ckpt.names)} names")
    folder = checkpoint_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{ckpt.round:04d}.npz"
    tmp = folder / f".round-{ckpt.round:04d}.tmp.npz"
    np.savez(tmp, *[np.asarray(a, dtype=np.float32) for a in ckpt.arrays])
    os.replace(tmp, path)
    meta = {"round": ckpt.round, "file": path.name, "names": list(ckpt.names),
            "base_model_sha256": ckpt.base_model_sha256, "sites": list(ckpt.sites), "saved_at": time.time(),
            **ckpt.meta}
    tmp_json = folder / ".latest.tmp"
    tmp_json.write_text(json.dumps(meta, indent=1))
    (folder / f"round-{ckpt.round:04d}.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp_json, folder / LATEST)
    return path


def load_checkpoint(state_dir: str | Path, round: int | None = None) -> Checkpoint | None:
    """The latest checkpoint (or the one of `round`), None when there is none."""
    folder = checkpoint_dir(state_dir)
    meta_path = folder / (LATEST if round is None else f"round-{round:04d}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(folder / meta["file"]) as z:
            arrays = [z[f"arr_{i}"] for i in range(len(meta["names"]))]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint ({exc}); delete it or restore a backup") from exc
    extra = {k: v for k, v in meta.items() if k not in {"round", "file", "names", "base_model_sha256", "sites"}}
    return Checkpoint(round=int(meta["round"]), arrays=arrays, names=list(meta["names"]),
                      base_model_sha256=str(meta["base_model_sha256"]), sites=list(meta.get("sites", [])),
                      meta=extra)


def check_compatible(ckpt: Checkpoint, names: Sequence[str], base_model_sha256: str) -> None:
    """Refuse to resume from a checkpoint of a different adapter layout or base model."""
    if list(ckpt.names) != list(names):
        raise CheckpointError(f"checkpoint round {ckpt.round} has a different LoRA layout ({len(ckpt.names)} "
                              f"arrays vs {len(names)}); use another state-dir or resume=false")
    if ckpt.base_model_sha256 != base_model_sha256:
        raise CheckpointError(f"checkpoint round {ckpt.round} belongs to base model {ckpt.base_model_sha256[:12]}, "
                              f"not {base_model_sha256[:12]}; use another state-dir or resume=false")
