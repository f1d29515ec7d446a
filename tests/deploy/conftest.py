"""Read the deploy/ definitions (systemd units, compose files, Containerfiles) and run their commands on loopback.

`Sandbox` stands in for a host: the absolute prefixes the definitions use (/opt/megaportrait, /etc/megaportrait,
/var/lib/megaportrait, /srv/megaportrait) map to this checkout and a temp dir, every well-known port maps to a free
loopback port, and 0.0.0.0 becomes 127.0.0.1. Commands are taken from the files as written; only those
substitutions are applied, so a wrong flag, path or port in a definition fails the test.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = REPO / ".venv" / "bin"
# Ports named in deploy/: render gRPC, health endpoints, SuperLink API, Flower gRPC health, SuperNode API, review.
KNOWN_PORTS = (50051, 9464, 9093, 9098, 9094, 9099, 8088)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- systemd units


@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]]

    def get(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def one(self, section: str, key: str) -> str:
        values = self.get(section, key)
        assert len(values) == 1, f"{self.path.name}: expected one [{section}] {key}=, found {values}"
        return values[0]

    def credentials(self) -> dict[str, str]:
        """LoadCredential= id -> source path."""
        out = {}
        for value in self.get("Service", "LoadCredential"):
            cid, _, src = value.partition(":")
            out[cid] = src
        return out

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.get("Service", "Environment"):
            for word in shlex.split(value):
                k, _, v = word.partition("=")
                env[k] = v
        return env

    def exec_start(self) -> list[str]:
        return shlex.split(self.one("Service", "ExecStart").lstrip("-@:+!"))


def parse_unit(path: Path) -> Unit:
    """systemd's INI dialect: repeated keys kept in order, `\\` continues a line, # and ; start comments."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: bad section header {line!r}"
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None and "=" in line, f"{path.name}: line outside a section or without '=': {line!r}"
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return Unit(path, sections)


def units() -> list[Path]:
    return sorted(DEPLOY.glob("*/*.service"))


def compose_files() -> list[Path]:
    return sorted(DEPLOY.glob("*/compose.yaml"))


def containerfiles() -> list[Path]:
    return sorted(DEPLOY.glob("*/Containerfile"))


def interpolate_compose(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` interpolation (the subset deploy/ uses)."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name, default)

    return re.sub(r"\$\{([A-Z0-9_]+)(:-([^}]*))?\}", sub, text)


def load_compose(path: Path) -> dict:
    return yaml.safe_load(interpolate_compose(path.read_text()))


# ------------------------------------------------------------------------------------------------- sandbox


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    descendants: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        if self.proc.poll() is None:
            try:
                self.descendants |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
            except psutil.Error:
                pass
            return True
        return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class Sandbox:
    """A fake host under `root`; see the module docstring. Every started service is stopped by `close()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefixes = {
            "/opt/megaportrait": str(REPO),
            "/etc/megaportrait": str(root / "etc"),
            "/var/lib/megaportrait": str(root / "var"),
            "/srv/megaportrait": str(root / "srv"),
        }
        self.ports = {p: free_port() for p in KNOWN_PORTS}
        self.services: list[Service] = []

    def port(self, deploy_port: int) -> int:
        return self.ports[deploy_port]

    def relocate(self, text: str) -> str:
        for prefix, here in self.prefixes.items():
            text = text.replace(prefix, here)
        text = text.replace("0.0.0.0:", "127.0.0.1:")
        return re.sub(r"(?<=:)(\d{4,5})\b", lambda m: str(self.ports.get(int(m.group(1)), m.group(1))), text)

    def relocate_argv(self, argv: list[str]) -> list[str]:
        """`relocate` each word, plus the split forms `--host 0.0.0.0` and `--port 9093`."""
        out: list[str] = []
        for word in argv:
            if word == "0.0.0.0":
                word = "127.0.0.1"
            elif out and out[-1] == "--port" and word.isdigit():
                word = str(self.ports.get(int(word), word))
            out.append(self.relocate(word))
        return out

    def host_path(self, deploy_path: str) -> Path:
        return Path(self.relocate(deploy_path))

    def install(self, source: Path, deploy_path: str, *, rewrite: bool = False) -> Path:
        """Copy a file or folder to where a definition expects it; `rewrite` relocates paths/ports in its text."""
        dest = self.host_path(deploy_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        elif rewrite:
            dest.write_text(self.relocate(source.read_text()))
        else:
            shutil.copy2(source, dest)
        return dest

    def base_env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE")}
        keep["PATH"] = f"{VENV_BIN}:/usr/bin:/bin"
        return keep

    def unit_command(self, unit: Unit) -> tuple[list[str], dict[str, str], Path]:
        """The unit's ExecStart as systemd would run it here: (argv, environment, working directory)."""
        creds = self.root / "credentials" / unit.path.stem
        creds.mkdir(parents=True, exist_ok=True)
        for cid, src in unit.credentials().items():
            shutil.copy2(self.host_path(src), creds / cid)
        env = self.base_env()
        for value in unit.get("Service", "EnvironmentFile"):
            for line in self.host_path(value.lstrip("-")).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    k, _, v = line.partition("=")
                    env[k.strip()] = self.relocate(v.strip())
        for k, v in unit.environment().items():
            env[k] = self.relocate(v.replace("%d", str(creds)))
        for state in unit.get("Service", "StateDirectory"):
            for d in state.split():
                (self.root / "var" / d.removeprefix("megaportrait/")).mkdir(parents=True, exist_ok=True)
        argv = []
        for word in unit.exec_start():
            word = word.replace("%d", str(creds))
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
        argv = self.relocate_argv(argv)
        cwd_values = unit.get("Service", "WorkingDirectory")
        cwd = self.host_path(cwd_values[0]) if cwd_values else self.root
        cwd.mkdir(parents=True, exist_ok=True)
        return argv, env, cwd

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Service:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, env=env, cwd=cwd or self.root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        svc = Service(name, proc, log)
        self.services.append(svc)
        return svc

    def start_unit(self, unit_path: Path) -> Service:
        unit = parse_unit(unit_path)
        argv, env, cwd = self.unit_command(unit)
        return self.start(unit_path.stem, argv, env, cwd)

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=env or self.base_env(), cwd=self.root, capture_output=True, text=True, timeout=timeout)

    def stop(self, svc: Service, timeout: float = 20) -> int | None:
        """SIGTERM the service (as systemd and docker stop do), then SIGKILL whatever of its tree is left."""
        svc.alive()
        if svc.proc.poll() is None:
            try:
                os.killpg(svc.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                svc.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        for pid in svc.descendants:  # Flower detaches superexec into its own session
            try:
                child = psutil.Process(pid)
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass
        return svc.proc.returncode

    def close(self) -> None:
        for svc in reversed(self.services):
            self.stop(svc, timeout=10)


@pytest.fixture
def sandbox(tmp_path: Path):
    box = Sandbox(tmp_path)
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="session")
def defs():
    """This module's helpers for the test files (which cannot import a conftest under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(
        REPO=REPO, DEPLOY=DEPLOY, VENV_BIN=VENV_BIN, Sandbox=Sandbox, Unit=Unit, parse_unit=parse_unit, units=units,
        compose_files=compose_files, containerfiles=containerfiles, load_compose=load_compose,
        interpolate_compose=interpolate_compose, free_port=free_port,
    )
