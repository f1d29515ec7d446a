"""Identity adapters on disk and on the wire: safetensors in diffusers' LoRA layout, metadata in the header.

One format everywhere: the tensors are `IdentityAdapter.lora_state` (``unet.<module>.lora_A.weight`` /
``lora_B.weight``, LoRA scale folded into lora_B), so `pipe.load_lora_weights(path)` and
`pipe.load_lora_weights(state_dict)` both load them as trained. Everything needed to audit the adapter (token,
rank, alpha, target modules, base model, privacy report, photo hashes, person_ref, created_at) is JSON under the
safetensors header key "megaportrait.identity_adapter"; `save_adapter` also writes it beside the file as
`<name>.json` for people to read. The header is authoritative. No pickle anywhere: bytes in, tensors and JSON out.

`apply_adapter` refuses an adapter trained on a different base model than the pipeline's (by UNet hash).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .errors import MegaPortraitError
from .records import BaseModelRef, IdentityAdapter, PrivacyReport

METADATA_KEY = "megaportrait.identity_adapter"
SCHEMA = "megaportrait.identity_adapter/1"
ADAPTER_NAME = "identity"


class AdapterError(MegaPortraitError):
    """An adapter file or payload is unreadable or not a MegaPortrait identity adapter."""

    reason = "adapter_invalid"


class BaseModelMismatch(MegaPortraitError):
    """The adapter was trained on a different base model than the pipeline it is being applied to."""

    reason = "base_model_mismatch"

    def __init__(self, adapter_base: BaseModelRef, pipeline_sha256: str) -> None:
        super().__init__(
            f"adapter was trained on base model {adapter_base.name} ({adapter_base.kind}, UNet sha256 "
            f"{adapter_base.sha256[:16]}...) but the pipeline's UNet hashes to {pipeline_sha256[:16]}...; load the "
            f"same base model weights on this node, or retrain the adapter on this one")
        self.adapter_base = adapter_base
        self.pipeline_sha256 = pipeline_sha256


def adapter_metadata(adapter: IdentityAdapter) -> dict[str, Any]:
    """The adapter's audit metadata as a JSON-ready dict (no tensors)."""
    return {
        "schema": SCHEMA,
        "person_ref": adapter.person_ref,
        "token": adapter.token,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "lora_scale_folded": True,
        "target_modules": list(adapter.target_modules),
        "base_model": asdict(adapter.base_model),
        "privacy": asdict(adapter.privacy),
        "photo_sha256": list(adapter.photo_sha256),
        "created_at": adapter.created_at.isoformat(),
    }


def _adapter_from_parts(tensors: dict[str, torch.Tensor], header: dict[str, str] | None, where: str
                        ) -> IdentityAdapter:
    if not header or METADATA_KEY not in header:
        raise AdapterError(f"{where}: no {METADATA_KEY} metadata; not a MegaPortrait identity adapter")
    try:
        meta = json.loads(header[METADATA_KEY])
        if meta.get("schema") != SCHEMA:
            raise AdapterError(f"{where}: unknown adapter schema {meta.get('schema')!r} (expected {SCHEMA})")
        adapter = IdentityAdapter(
            person_ref=str(meta["person_ref"]),
            token=str(meta["token"]),
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            target_modules=tuple(meta["target_modules"]),
            lora_state=tensors,
            base_model=BaseModelRef(**meta["base_model"]),
            privacy=PrivacyReport(**meta["privacy"]),
            photo_sha256=tuple(meta["photo_sha256"]),
            created_at=datetime.fromisoformat(meta["created_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{where}: adapter metadata is incomplete or malformed: {exc}") from exc
    bad = [k for k in tensors if not (k.startswith("unet.") and ".lora_" in k)]
    if not tensors or bad:
        raise AdapterError(f"{where}: tensors are not a UNet LoRA in diffusers layout (e.g. {bad[:1]})")
    return adapter


def _safetensors_header(data: bytes) -> dict[str, str] | None:
    """The `__metadata__` map of a safetensors blob (format: u64 little-endian header length, JSON header)."""
    if len(data) < 8:
        raise AdapterError("adapter bytes too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise AdapterError("adapter bytes truncated (safetensors header runs past the end)")
    try:
        return json.loads(data[8:8 + n]).get("__metadata__")
    except (ValueError, AttributeError) as exc:
        raise AdapterError(f"adapter safetensors header is not valid JSON: {exc}") from exc


def adapter_to_bytes(adapter: IdentityAdapter) -> bytes:
    """Serialise an adapter as one safetensors blob (tensors + metadata header); what client/payload.py seals."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.lora_state.items()}
    return save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(adapter_metadata(adapter))})


def adapter_from_bytes(data: bytes) -> IdentityAdapter:
    """Parse `adapter_to_bytes` output; raises AdapterError for anything else. No pickle."""
    from safetensors.torch import load

    header = _safetensors_header(data)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise AdapterError(f"adapter bytes are not valid safetensors: {exc}") from exc
    return _adapter_from_parts(tensors, header, "<bytes>")


def save_adapter(adapter: IdentityAdapter, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `path` (.safetensors) and `path.with_suffix('.json')` atomically; refuses to replace an existing
    adapter unless `overwrite`. Returns the safetensors path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    if path.exists() and not overwrite:
        raise AdapterError(f"{path} already exists; pass overwrite=True to replace it", reason="adapter_exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    side = path.with_suffix(".json")
    for target, payload in ((path, adapter_to_bytes(adapter)),
                            (side, (json.dumps(adapter_metadata(adapter), indent=2) + "\n").encode())):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
    return path


def load_adapter(path: str | Path) -> IdentityAdapter:
    """Read an adapter written by `save_adapter` (the header is authoritative; the JSON beside it is for people)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist", reason="adapter_missing")
    try:
        return adapter_from_bytes(path.read_bytes())
    except AdapterError as exc:
        raise AdapterError(f"{path}: {exc}", reason=exc.reason) from exc


def check_base_model(pipe: Any, adapter: IdentityAdapter, base_model: BaseModelRef | None = None) -> None:
    """Raise BaseModelMismatch unless `adapter` was trained on the pipeline's base model. With `base_model` (the
    ref the pipeline was loaded with) the hashes are compared directly; otherwise the UNet is hashed."""
    from .base_models import unet_sha256

    actual = base_model.sha256 if base_model is not None else unet_sha256(pipe.unet)
    if actual != adapter.base_model.sha256:
        raise BaseModelMismatch(adapter.base_model, actual)


def apply_adapter(pipe: Any, adapter: IdentityAdapter, *, base_model: BaseModelRef | None = None,
                  adapter_name: str = ADAPTER_NAME) -> Any:
    """Load `adapter` into a diffusers pipeline (`pipe.load_lora_weights`) after checking its base model; returns
    `pipe`. Prompts then use `adapter.token`, e.g. "a photo of sks person"."""
    check_base_model(pipe, adapter, base_model)
    pipe.load_lora_weights({k: v.clone() for k, v in adapter.lora_state.items()}, adapter_name=adapter_name)
    return pipe
