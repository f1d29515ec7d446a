"""The operator's coordinator commands without a SuperLink: where settings come from, what is refused by name, and
how a stop is told apart from a crash. The commands against a live SuperLink run in tests/docs (one-machine.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from megaportrait.server.coordinator.app import _record_interrupted
from megaportrait.server.coordinator.auditing import CoordinatorAudit
from megaportrait.server.coordinator.checkpoint import Checkpoint, save_checkpoint
from megaportrait.server.coordinator.deployment import STOP_REQUEST, run_config_from_settings
from megaportrait.shared import audit
from megaportrait.shared.cli import app
from megaportrait.shared.config import load_settings
from megaportrait.shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def _config(tmp_path, body: str):
    path = tmp_path / "coordinator.yaml"
    path.write_text(body)
    return path


def test_the_shipped_coordinator_yaml_drives_the_run_config(tmp_path):
    settings = load_settings(REPO / "deploy" / "coordinator" / "coordinator.yaml").coordinator
    config = run_config_from_settings(settings)
    assert config["num-server-rounds"] == 20 and config["min-sites"] == 3
    assert config["state-dir"] == "/var/lib/megaportrait/coordinator/federation"
    assert config["round-timeout"] == 300.0 and config["secure-aggregation"] is True
    # the command line wins over the file
    assert run_config_from_settings(settings, {"num-server-rounds": 2})["num-server-rounds"] == 2


def test_unknown_or_unused_coordinator_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="epsilon_budget_per_site"):
        load_settings(_config(tmp_path, "coordinator:\n  epsilon_budget_per_site: 8.0\n"))
    settings = load_settings(_config(tmp_path, "coordinator:\n  run_config:\n    epsilon-budgett: 8.0\n")).coordinator
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epsilon-budgett'\]"):
        run_config_from_settings(settings)
    settings = load_settings(_config(tmp_path, "coordinator:\n  run_config:\n    num-server-rounds: 3\n")).coordinator
    with pytest.raises(ConfigError, match="num-server-rounds"):
        run_config_from_settings(settings)


def test_status_reads_the_state_dir_of_the_settings_and_refuses_to_guess(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGAPORTRAIT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["coordinator", "status"])
    assert result.exit_code == 2 and "no state dir" in result.output
    state = tmp_path / "federation"
    state.mkdir()
    (state / "status.json").write_text(json.dumps({"run_id": "7", "state": "finished", "round": 2, "rounds": 2}))
    config = _config(tmp_path, f"coordinator:\n  state_dir: {state}\n")
    result = runner.invoke(app, ["coordinator", "status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["status"]["state"] == "finished" and shown["state_dir"] == str(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coordinator.yaml", "federation"]  # nothing left in cwd


@pytest.mark.parametrize("requested", [True, False], ids=["operator-stop", "crash"])
@pytest.mark.parametrize("ending", [SystemExit(0), RuntimeError("HTTP 401: Runtime task-token authentication failed")],
                         ids=["signal", "token-revoked"])
def test_a_requested_stop_is_audited_as_run_stop_and_anything_else_as_run_fail(tmp_path, requested, ending):
    # After `flwr stop` the ServerApp ends either by Flower's SIGINT (SystemExit) or, when the SuperLink revoked the
    # run's token first, by its next Grid call failing: both are the operator's stop (CI saw the second as run.fail).
    state = tmp_path / "federation"
    save_checkpoint(state, Checkpoint(round=1, arrays=[np.zeros(2, np.float32)], names=["a"], base_model_sha256="0"))
    if requested:
        (state / STOP_REQUEST).write_text(json.dumps({"run_id": "42", "at": 1.0}))
    log = CoordinatorAudit.open(state, run_id=42, run_config={})
    _record_interrupted(state, 42, 2, log, ending)
    log.close()
    entries = list(audit.read_entries(state / "audit" / "audit.jsonl"))
    status = json.loads((state / "status.json").read_text())
    if requested:
        assert entries[-1].action == "run.stop" and entries[-1].outcome == "ok" and status["state"] == "stopped"
    else:
        assert entries[-1].action == "run.fail" and entries[-1].detail["error"] == type(ending).__name__
        assert status["state"] == "failed"
    assert status["round"] == 1
