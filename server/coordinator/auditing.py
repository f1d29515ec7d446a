"""The coordinator's own audit log (`shared.audit`: append-only, hash-chained, Ed25519-signed entries).

Layout under the coordinator's state folder (beside `checkpoints/` and `budget.json`):

    audit/audit.jsonl              the log (+ audit.jsonl.checkpoints, the signed (size, head) checkpoints)
    audit/signing.key              its Ed25519 key (0600), created on the first start
    audit/signing.key.pub          the public key verifiers need: `megaportrait audit verify <log> -k <pub>`

What is recorded (component "coordinator", actor "run:<run id>" or "site:<site id>"; `policy` is the hash of the
run config in force; `data` holds hashes only, never personal data; sites are named by their site id):

- `run.start`: config hash, strategy, clipping and noise settings, per-site budget, min sites, rounds, SecAgg+;
- `run.resume`: the checkpoint round resumed from, its file hash and the adapter hash;
- `budget.refuse` (outcome "refused"): a site whose next round would exceed the budget, with its epsilon and the
  budget;
- `round.aggregate` (ok): sites admitted and aggregated, refused (epsilon, budget), declined, silent, failures,
  the DP record (noise stddev...), the global adapter hash after the round and the checkpoint file hash;
  `round.skip` / `round.drop` (outcome "failed"): a round with too few sites, or dropped, with the reason;
- `run.finish` (ok), `run.stop` (ok: the operator stopped it with `coordinator stop`) or `run.fail` (failed, with
  the error class).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megaportrait.shared.audit import AuditLog, Outcome, open_component_log

COMPONENT = "coordinator"
AUDIT_DIR = "audit"


def audit_paths(state_dir: str | Path) -> tuple[Path, Path]:
    """(log, signing key) of the coordinator whose state folder is `state_dir`."""
    folder = Path(state_dir) / AUDIT_DIR
    return folder / "audit.jsonl", folder / "signing.key"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_sha256(arrays: Sequence[np.ndarray]) -> str:
    """The global adapter's hash: sha256 over each array's shape and float32 bytes, in order (what a checkpoint
    holds, so `adapter_sha256(load_checkpoint(d).arrays)` names the same adapter)."""
    digest = hashlib.sha256(b"megaportrait-adapter-v1\n")
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
        digest.update(json.dumps(list(a.shape)).encode() + b"\n")
        digest.update(a.tobytes())
    return digest.hexdigest()


def config_sha256(run_config: dict[str, Any]) -> str:
    """The run config's hash (sorted keys, compact JSON): the policy version of the coordinator's entries."""
    text = json.dumps(run_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CoordinatorAudit:
    """What the ServerApp and `SiteBudgetStrategy` write to the coordinator's log; see the module doc."""

    def __init__(self, log: AuditLog, *, run_id: Any, policy: str) -> None:
        self.log = log
        self.actor = f"run:{run_id}"
        self.policy = policy

    @classmethod
    def open(cls, state_dir: str | Path, *, run_id: Any, run_config: dict[str, Any]) -> "CoordinatorAudit":
        log_path, key_path = audit_paths(state_dir)
        return cls(open_component_log(log_path, key_path, component=COMPONENT), run_id=run_id,
                   policy=config_sha256(run_config))

    def _append(self, action: str, *, actor: str | None = None, outcome: Outcome = "ok",
                data: Sequence[str] = (), detail: dict[str, Any] | None = None) -> None:
        self.log.append(action, actor=actor or self.actor, outcome=outcome, data=list(data), policy=self.policy,
                        detail=_plain(detail or {}))

    def run_start(self, cfg: dict[str, Any], run_config: dict[str, Any], *, base_model_sha256: str,
                  initial_adapter: str) -> None:
        self._append("run.start", data=[self.policy, base_model_sha256, initial_adapter], detail={
            "config_sha256": self.policy, "strategy": str(run_config.get("strategy", "fedavg")),
            "clipping": str(run_config.get("clipping", "fixed")),
            "clipping_norm": float(run_config.get("clipping-norm", 1.0)),
            "noise_multiplier": float(run_config.get("server-noise-multiplier", 1.0)),
            "epsilon_budget_per_site": cfg["budget"], "planned_site_epsilon": cfg.get("planned_site_epsilon"),
            "privacy_policy": cfg.get("privacy_policy"), "min_sites": cfg["min_sites"], "rounds": cfg["rounds"],
            "secure_aggregation": cfg["secure_aggregation"], "local_steps": cfg["local_steps"],
            "base_model_sha256": base_model_sha256, "initial_adapter_sha256": initial_adapter})

    def resume(self, round_: int, checkpoint_file: Path, adapter: str) -> None:
        file_hash = file_sha256(checkpoint_file)
        self._append("run.resume", data=[file_hash, adapter], detail={
            "round": round_, "checkpoint": checkpoint_file.name, "checkpoint_sha256": file_hash,
            "adapter_sha256": adapter})

    def budget_refused(self, site: str, server_round: int, epsilon_next: float, budget: float) -> None:
        self._append("budget.refuse", actor=f"site:{site}", outcome="refused", detail={
            "round": server_round, "site": site, "epsilon_next": epsilon_next, "budget": budget})

    def round_outcome(self, server_round: int, report: dict[str, Any], *, adapter: str = "",
                      checkpoint_file: Path | None = None, reason: str = "") -> None:
        """One round: aggregated (an adapter hash given), else skipped/dropped for `reason`."""
        detail = {"round": server_round, **{k: v for k, v in report.items() if k != "examples"}}
        data: list[str] = []
        if adapter:
            detail["adapter_sha256"] = adapter
            data.append(adapter)
        if checkpoint_file is not None:
            detail["checkpoint"] = checkpoint_file.name
            detail["checkpoint_sha256"] = file_sha256(checkpoint_file)
            data.append(detail["checkpoint_sha256"])
        if adapter:
            self._append("round.aggregate", data=data, detail=detail)
        else:
            detail["reason"] = reason
            self._append("round.skip" if reason == "too_few_sites" else "round.drop", outcome="failed",
                         data=data, detail=detail)

    def run_end(self, round_done: int, *, error: BaseException | None = None) -> None:
        if error is None:
            self._append("run.finish", detail={"round": round_done})
        else:
            self._append("run.fail", outcome="failed", detail={"round": round_done, "error": type(error).__name__})

    def run_stop(self, round_done: int, *, requested_at: float) -> None:
        """The operator stopped the run (`coordinator stop`): not a failure."""
        self._append("run.stop", detail={"round": round_done, "requested_at": requested_at, "by": "operator"})

    def close(self) -> None:
        self.log.close()


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars to Python, dict keys to str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
