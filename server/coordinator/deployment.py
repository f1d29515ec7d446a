"""The two ways to run a federation: Flower's simulation engine, and its deployment engine over TLS.

Simulation (`simulate`): the ServerApp and one virtual SuperNode per site folder in one process (Ray runs the
ClientApps). For the demo, tests and benchmarks. Given the sites' consent records (`consent=`), each simulated site
checks its own consent ledger every round, as a deployed one does.

Deployment (`LocalFederation`, or the pieces it composes, which the CLI exposes one by one):

1. `issue_credentials`: a CA (shared/pki.py), the SuperLink's TLS server certificate, and one ECDSA P-384 key pair
   per site for Flower's SuperNode authentication (OpenSSH format, as `flower-supernode` and
   `flwr supernode register` expect).
2. `start_superlink`: `flower-superlink` with TLS on all its APIs (one HTTPS port in flwr 1.42) and
   `--enable-supernode-auth`: only SuperNodes whose public key was registered may connect.
3. `register_site`: `flwr supernode register <site>.pub` through the SuperLink's Control API.
4. `start_supernode`: `flower-supernode` for one site, verifying the SuperLink against the CA, authenticating with
   the site's private key, its photo and state folders and its consent ledger in `--node-config`. ClientApps run
   in subprocesses (`--isolation subprocess`, the default), one per message.
5. `submit_run`: `flwr run <app> <connection>`: builds the FAB (code only, see `fab-include` in pyproject.toml)
   and starts the ServerApp on the SuperLink with the given run-config overrides.

The Flower CLI reads SuperLink connections from `$FLWR_HOME/config.toml`; `write_connection` writes one there.
Every process started here gets its own session (process group), and `ManagedProcess.stop` ends that group.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from megaportrait.shared.errors import ConfigError, MegaPortraitError

APP_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "megaportrait"


class DeploymentError(MegaPortraitError):
    """A Flower process did not start, register or answer; the message names it and its log file."""

    reason = "deployment_failed"


# --- run config -------------------------------------------------------------------------------------------


def app_dir() -> Path:
    """The Flower app: the project folder whose pyproject.toml has [tool.flwr.app]."""
    pyproject = APP_ROOT / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise ConfigError(f"no Flower app at {APP_ROOT}: run from a source checkout (pyproject.toml with "
                          "[tool.flwr.app])")
    return APP_ROOT


def default_run_config() -> dict[str, Any]:
    """[tool.flwr.app.config] from pyproject.toml: the one place run settings are defined."""
    data = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    return dict(data["tool"]["flwr"]["app"].get("config", {}))


def fused_run_config(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults with `overrides`; an unknown key is an error (as in `flwr run --run-config`)."""
    config = default_run_config()
    unknown = sorted(set(overrides or {}) - set(config))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known: {sorted(config)}")
    config.update(overrides or {})
    return config


# --- simulation ---------------------------------------------------------------------------------------------


@dataclass
class SimulationResult:
    """What a simulated federation left in its coordinator state folder."""

    state_dir: Path
    seconds: float
    status: dict[str, Any]
    budget: dict[str, Any]
    consent_checked: bool = True  # False: simulate() ran without consent records (see its `consent`)


def simulate(sites_dir: str | Path, state_dir: str | Path, *, site_state_dir: str | Path | None = None,
             run_config: dict[str, Any] | None = None, num_sites: int | None = None, client_app: Any = None,
             server_app: Any = None, cpus: int = 2, verbose: bool = False,
             consent: Mapping[str, Any] | str | Path | None = None) -> SimulationResult:
    """Run the federation on Flower's simulation engine: one virtual SuperNode per sub-folder of `sites_dir`
    (person folders inside, named by person_ref).

    consent: each site's consent records, which its client checks every round: a mapping site id ->
    `client.federation.SiteConsent`, or a folder with one sub-folder per site in `SiteConsent.in_folder` layout
    (`record_federated_consent` creates one). A site without an entry declines every round. Left out (and no
    `sim-consent` in `run_config`), the sites check nothing and train on every person folder: a warning says so
    and the result has `consent_checked = False`; only for callers that filtered consent themselves.
    run_config: overrides of [tool.flwr.app.config]; `state-dir`, `sim-sites-dir`, `sim-state-dir` and
    `sim-consent` are set from the arguments. client_app / server_app default to the project's apps (tests may
    wrap them).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    # Flower's private entry point, on purpose: the public `flwr.simulation.run_simulation` (deprecated in 1.42 in
    # favour of `flwr run`) takes no run config and no ServerApp context, so the apps would run with an empty
    # run config; `flwr run` with a local simulation federation starts a detached managed SuperLink on fixed ports
    # and runs only a packaged FAB, not the (possibly wrapped) app objects tests pass here. `_run_simulation` is
    # what both of them call; flwr is pinned (==1.42.0) in pyproject.toml, so its signature cannot move under us.
    from flwr.simulation.run_simulation import _run_simulation  # noqa: PLC2701
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from megaportrait.client.federation import UNCHECKED

    sites_dir = Path(sites_dir).resolve()
    folders = sorted(p for p in sites_dir.iterdir() if p.is_dir()) if sites_dir.is_dir() else []
    if not folders:
        raise ConfigError(f"{sites_dir}: no site folders (one sub-folder of photos per site)")
    num_sites = num_sites or len(folders)
    state_dir = Path(state_dir).resolve()
    site_state_dir = Path(site_state_dir).resolve() if site_state_dir else state_dir.parent / "sites"
    overrides = dict(run_config or {})
    overrides.update({"state-dir": str(state_dir), "sim-sites-dir": str(sites_dir),
                      "sim-state-dir": str(site_state_dir)})
    if consent is not None:
        overrides["sim-consent"] = str(write_simulation_consent(site_state_dir / "sim-consent.json",
                                                                [f.name for f in folders[:num_sites]], consent))
    elif not str(overrides.get("sim-consent", "")):
        # Kept for callers written before sites checked consent each round (they filtered photos themselves).
        logging.getLogger("megaportrait.coordinator").warning(
            "simulate() called without consent records: the simulated sites will NOT check consent and will train "
            "on every person folder in %s. Pass consent= (per-site ledgers, see "
            "client.federation.record_federated_consent) so that each round checks it.", sites_dir)
        overrides["sim-consent"] = UNCHECKED
    config = fused_run_config(overrides)

    if client_app is None:
        from megaportrait.client.federation import app as client_app
    if server_app is None:
        from megaportrait.server.coordinator.app import app as server_app

    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
    run.override_config = config
    run.primary_task_id = int.from_bytes(os.urandom(7), "big")
    run.federation_id = NOOP_FEDERATION_ID
    # As `flwr.simulation.run_simulation` does for the run it creates itself.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    # The clients read the run config from a Flower app folder: a throwaway one holding exactly `config`.
    with tempfile.TemporaryDirectory(prefix="megaportrait-sim-") as tmp:
        _write_app_config(Path(tmp), config)
        context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=dict(config))
        started = time.perf_counter()
        _run_simulation(num_supernodes=num_sites, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client_app, server_app=server_app, backend_name="ray",
                        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                        "init_args": {"num_cpus": cpus, "num_gpus": 0}},
                        server_app_context=context, app_dir=tmp, run=run, is_app=True, verbose_logging=verbose)
        seconds = time.perf_counter() - started
    return SimulationResult(state_dir=state_dir, seconds=seconds, status=_read_json(state_dir / "status.json"),
                            budget=_read_json(state_dir / "budget.json"),
                            consent_checked=config["sim-consent"] != UNCHECKED)


def write_simulation_consent(path: Path, sites: Sequence[str], consent: Mapping[str, Any] | str | Path) -> Path:
    """The `sim-consent` file: site id -> consent paths, from a mapping of `SiteConsent`s or a folder of per-site
    `SiteConsent.in_folder` layouts. Sites with no records are logged (they will decline every round)."""
    from megaportrait.client.federation import SiteConsent

    if isinstance(consent, Mapping):
        entries = {site: c if isinstance(c, SiteConsent) else SiteConsent.from_json(c) for site, c in consent.items()}
    else:
        folder = Path(consent)
        if not folder.is_dir():
            raise ConfigError(f"consent folder {folder} does not exist")
        entries = {site: SiteConsent.in_folder(folder / site) for site in sites
                   if (folder / site / "consent.sqlite").is_file()}
    unknown = sorted(set(entries) - set(sites))
    if unknown:
        raise ConfigError(f"consent records for unknown site(s) {unknown}; the sites are {sorted(sites)}")
    missing = sorted(set(sites) - set(entries))
    if missing:
        logging.getLogger("megaportrait.coordinator").warning(
            "no consent records for site(s) %s: they will decline every round", missing)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({site: c.to_json() for site, c in entries.items()}, indent=1))
    return path


def _write_app_config(folder: Path, config: dict[str, Any]) -> None:
    import tomli_w

    project = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    flwr_app = dict(project["tool"]["flwr"]["app"], config=config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps({
        "project": {k: project["project"][k] for k in ("name", "version")},
        "tool": {"flwr": {"app": flwr_app}}}))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# --- deployment: credentials --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FederationCredentials:
    """Paths of a federation's TLS and node-authentication material (all in one folder)."""

    directory: Path
    sites: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def superlink_cert(self) -> Path:
        return self.directory / "superlink.pem"

    @property
    def superlink_key(self) -> Path:
        return self.directory / "superlink.key"

    def site_private_key(self, site: str) -> Path:
        return self.directory / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.directory / "sites" / f"{site}.pub"

    @classmethod
    def load(cls, directory: str | Path) -> "FederationCredentials":
        directory = Path(directory)
        if not (directory / "ca.pem").is_file():
            raise ConfigError(f"{directory}: no ca.pem; run `megaportrait coordinator certs` first")
        sites = tuple(sorted(p.stem for p in (directory / "sites").glob("*.pub")))
        return cls(directory, sites)


def issue_credentials(directory: str | Path, sites: Sequence[str],
                      hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> FederationCredentials:
    """Create (or extend) a federation's credentials: the CA and SuperLink certificate once, a node-auth key pair
    per new site. An existing CA is reused, never replaced."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from megaportrait.shared import pki

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.key").exists():
        ca = pki.Credential.load(directory, "ca")
    else:
        ca = pki.create_ca("MegaPortrait federation CA")
        ca.save(directory, "ca")
    if not (directory / "superlink.key").exists():
        ips = tuple(h for h in hosts if pki._is_ip(h))
        names = tuple(h for h in hosts if not pki._is_ip(h))
        pki.issue_certificate(ca, "superlink", role="server", dns_names=names, ip_addresses=ips).save(
            directory, "superlink")
    site_dir = directory / "sites"
    site_dir.mkdir(exist_ok=True)
    for site in sites:
        if not site or any(c in site for c in "/\\ ") or site.startswith("."):
            raise ConfigError(f"site id {site!r}: use letters, digits, '-' or '_'")
        if (site_dir / site).exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        fd = os.open(site_dir / site, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
        (site_dir / f"{site}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return FederationCredentials.load(directory)


def write_connection(flwr_home: str | Path, address: str, ca_cert: str | Path, name: str = CONNECTION) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection (TLS, verified against `ca_cert`)."""
    import tomli_w

    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: {
        "address": address, "root-certificates": str(Path(ca_cert).resolve())}}}))
    return path


# --- deployment: processes ----------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that was free a moment ago."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: str | Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: this interpreter's bin folder first on PATH (Flower starts
    `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name), one CPU thread per process."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


@dataclass
class ManagedProcess:
    """A Flower process we started, in its own process group; `stop` ends the group (it spawns children)."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def run_until_interrupted(self) -> None:
        """Wait for the process to end or for Ctrl-C, then stop its whole group: how the CLI serves it."""
        try:
            self.popen.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def kill(self) -> None:
        """SIGKILL the whole group now (a crash, not a shutdown)."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # children (superexec, app processes) may outlive their parent
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None
           ) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_fh:
        popen = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
    return ManagedProcess(name, popen, log_path)


def wait_for_port(host: str, port: int, timeout: float, process: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise DeploymentError(f"{process.name} exited before listening on {host}:{port}; see {process.log_path}")
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:.0f} s"
                          + (f"; see {process.log_path}" if process else ""))


def start_superlink(creds: FederationCredentials, *, port: int, state_dir: str | Path, host: str = "127.0.0.1",
                    timeout: float = 60.0) -> ManagedProcess:
    """`flower-superlink` with TLS and SuperNode authentication; its link state in `state_dir/superlink.db`."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [_tool("flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile",
            str(creds.superlink_cert), "--ssl-keyfile", str(creds.superlink_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port),
            "--database", str(state_dir / "superlink.db")]
    process = _spawn("superlink", argv, state_dir / "superlink.log", flower_env(state_dir / "flwr-home"),
                     cwd=state_dir)
    wait_for_port(host, port, timeout, process)
    return process


def register_site(site: str, creds: FederationCredentials, flwr_home: str | Path, timeout: float = 60.0) -> int:
    """Register the site's public key with the SuperLink (`flwr supernode register`); returns its node id."""
    result = subprocess.run([_tool("flwr"), "supernode", "register", str(creds.site_public_key(site)), CONNECTION,
                             "--name", site, "--format", "json"], capture_output=True, text=True, timeout=timeout,
                            env=flower_env(flwr_home))
    payload = _last_json(result.stdout)
    if result.returncode != 0 or not payload.get("success"):
        raise DeploymentError(f"registering site {site} failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    return int(payload["node-id"])


def start_supernode(site: str, creds: FederationCredentials, *, superlink: str, data_dir: str | Path,
                    state_dir: str | Path, runtime_port: int, host: str = "127.0.0.1", consent: Any = None
                    ) -> ManagedProcess:
    """`flower-supernode` for one site: TLS to the SuperLink (CA-verified), authenticated with the site's key;
    photos in `data_dir`, everything the site keeps (and its logs) in `state_dir`; `consent`
    (`client.federation.SiteConsent`) names its consent ledger, key, audit log and policy. Without it the node
    config carries none, and the site's client falls back to `$MEGAPORTRAIT_CONFIG` or declines every round."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    node_config = (f'site-id="{site}" data-dir="{Path(data_dir).resolve()}" state-dir="{state_dir}"')
    if consent is not None:
        node_config += "".join(f' {key}="{Path(value).resolve()}"' for key, value in (
            ("consent-ledger", consent.ledger), ("consent-key", consent.key), ("audit-log", consent.audit_log),
            ("consent-policy", consent.policy)))
    argv = [_tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(creds.ca_cert),
            "--auth-supernode-private-key", str(creds.site_private_key(site)), "--node-config", node_config,
            "--host", host, "--port", str(runtime_port), "--max-wait-time", "120"]
    return _spawn(f"supernode {site}", argv, state_dir / "supernode.log", flower_env(state_dir / "flwr-home"),
                  cwd=state_dir)


def stage_app(dest: str | Path) -> Path:
    """A copy of the Flower app holding only what goes into the FAB (pyproject.toml and the code named by
    `fab-include`). `flwr build` walks every file under the app folder before filtering, which in a checkout
    with its virtual environment inside takes tens of seconds; the staged copy takes milliseconds."""
    import pathspec

    source = app_dir()
    dest = Path(dest) / "megaportrait-app"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(source / "pyproject.toml", dest / "pyproject.toml")
    patterns = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get(
        "fab-include", ["client/**/*.py", "server/**/*.py", "shared/**/*.py"])
    spec = pathspec.PathSpec.from_lines("gitwildmatch", patterns)
    for top in {pattern.split("/", 1)[0] for pattern in patterns}:
        for path in sorted((source / top).rglob("*")):
            rel = path.relative_to(source).as_posix()
            if path.is_file() and "__pycache__" not in rel and spec.match_file(rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)
    return dest


def submit_run(flwr_home: str | Path, run_config: dict[str, Any] | None = None, timeout: float = 120.0) -> int:
    """`flwr run <app> megaportrait --run-config ...`: ship the FAB and start the ServerApp; returns the run id."""
    staged = stage_app(Path(flwr_home) / "staged")
    argv = [_tool("flwr"), "run", str(staged), CONNECTION, "--format", "json"]
    if run_config:
        argv += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=flower_env(flwr_home),
                            cwd=str(flwr_home))
    payload = _last_json(result.stdout)
    if result.returncode != 0 or "run-id" not in payload:
        raise DeploymentError(f"flwr run failed: {result.stdout[-800:]} {result.stderr[-800:]}")
    return int(payload["run-id"])


def stop_run(flwr_home: str | Path, run_id: int, timeout: float = 60.0) -> None:
    """`flwr stop <run-id> megaportrait`: mark a run stopped at the SuperLink. After its coordinator process died
    (crash, kill), this lets the SuperNodes drop the dead run's undelivered messages at once instead of retrying
    them until the SuperLink notices the missing heartbeat (about a minute); then submit a run that resumes."""
    result = subprocess.run([_tool("flwr"), "stop", str(run_id), CONNECTION, "--format", "json"],
                            capture_output=True, text=True, timeout=timeout, env=flower_env(flwr_home),
                            cwd=str(flwr_home))
    payload = _last_json(result.stdout)
    if result.returncode != 0 or not payload.get("success"):
        raise DeploymentError(f"flwr stop {run_id} failed: {result.stdout[-800:]} {result.stderr[-800:]}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _last_json(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found next to {sys.executable} or on PATH; install flwr[simulation]")
    return found


def serverapp_processes(superlink: ManagedProcess) -> list[Any]:
    """The `flwr-serverapp` processes under a SuperLink (the running coordinator, one per active run)."""
    import psutil

    try:
        children = psutil.Process(superlink.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "flwr-serverapp" in " ".join(child.cmdline()):
                out.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return [p for p in out if p.status() != psutil.STATUS_ZOMBIE]


# --- a whole federation on one machine ----------------------------------------------------------------------


@dataclass
class LocalFederation:
    """A SuperLink and one SuperNode per site on this machine, over TLS with node authentication: for the demo,
    the tests and the benchmark. Use as a context manager; every process it started is ended on exit.

    sites: site id -> photo folder. root: where credentials, logs, the coordinator and site state go.
    consent: site id -> `client.federation.SiteConsent` (its consent ledger, key, audit log), put in the site's
    node config.
    """

    sites: dict[str, Path]
    root: Path
    host: str = "127.0.0.1"
    superlink: ManagedProcess | None = None
    supernodes: dict[str, ManagedProcess] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)
    port: int = 0
    consent: dict[str, Any] = field(default_factory=dict)

    @property
    def creds_dir(self) -> Path:
        return self.root / "credentials"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-cli"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    def site_state_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        creds = issue_credentials(self.creds_dir, list(self.sites), hosts=(self.host, "localhost"))
        self.port = free_port(self.host)
        self.superlink = start_superlink(creds, port=self.port, state_dir=self.root / "superlink", host=self.host)
        write_connection(self.flwr_home, f"{self.host}:{self.port}", creds.ca_cert)
        # One `flwr supernode register` process per site, side by side (each is mostly interpreter start-up).
        with ThreadPoolExecutor(max_workers=len(self.sites) or 1) as pool:
            ids = pool.map(lambda site: register_site(site, creds, self.flwr_home), list(self.sites))
            self.node_ids.update(zip(self.sites, ids))
        for site in self.sites:
            self.start_site(site)

    def start_site(self, site: str) -> ManagedProcess:
        creds = FederationCredentials.load(self.creds_dir)
        process = start_supernode(site, creds, superlink=f"{self.host}:{self.port}", data_dir=self.sites[site],
                                  state_dir=self.site_state_dir(site), runtime_port=free_port(self.host),
                                  host=self.host, consent=self.consent.get(site))
        self.supernodes[site] = process
        return process

    def run(self, run_config: dict[str, Any] | None = None) -> int:
        """Submit a run with `state-dir` set to this federation's coordinator folder."""
        config = {"state-dir": str(self.coordinator_dir), **(run_config or {})}
        return submit_run(self.flwr_home, config)

    def stop_run(self, run_id: int) -> None:
        """Mark a run stopped at the SuperLink (see `stop_run`)."""
        stop_run(self.flwr_home, run_id)

    def status(self) -> dict[str, Any]:
        return _read_json(self.coordinator_dir / "status.json")

    def wait_for(self, predicate: Any, timeout: float, what: str, poll: float = 0.5) -> Any:
        """Poll `predicate()` until it returns something truthy; a dead SuperLink or the timeout raise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.superlink is not None and not self.superlink.alive():
                raise DeploymentError(f"superlink died while waiting for {what}; see {self.superlink.log_path}")
            time.sleep(poll)
        raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}; logs under {self.root}")

    def stop(self) -> None:
        for process in list(self.supernodes.values()):
            process.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def processes(self) -> Iterable[ManagedProcess]:
        if self.superlink is not None:
            yield self.superlink
        yield from self.supernodes.values()


# --- the operator's view of a run: settings, stop, site ids -----------------------------------------------------

SITES_FILE = "sites.json"
STOP_REQUEST = "stop-request.json"
SETTINGS_KEYS = {"rounds": "num-server-rounds", "min_sites": "min-sites", "state_dir": "state-dir"}


def run_config_from_settings(settings: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run config `coordinator run` submits: [tool.flwr.app.config], then the settings' `coordinator` section
    (`rounds`, `min_sites`, `state_dir`, and `run_config` for any other key), then `overrides` (the CLI's options).
    An unknown key, or one given both as a field and in `run_config`, is refused by name."""
    from_settings = dict(settings.run_config)
    both = sorted(k for field_, k in SETTINGS_KEYS.items() if k in from_settings)
    if both:
        raise ConfigError(f"coordinator.run_config sets {both}: set them as coordinator.rounds, min_sites, state_dir")
    unknown = sorted(set(from_settings) - set(default_run_config()))
    if unknown:
        raise ConfigError(f"coordinator.run_config: unknown key(s) {unknown}; known: {sorted(default_run_config())}")
    from_settings.update({key: getattr(settings, field_) for field_, key in SETTINGS_KEYS.items()})
    from_settings["state-dir"] = str(Path(from_settings["state-dir"]).expanduser().resolve())
    return fused_run_config({**from_settings, **(overrides or {})})


def record_site_node(state_dir: Path, site: str, node_id: int, public_key: Path) -> None:
    """Remember which node id the SuperLink gave a site's key (`flwr supernode ls` shows node ids only)."""
    import hashlib

    nodes = read_site_nodes(state_dir)
    nodes[str(node_id)] = {"site": site, "public_key_sha256": hashlib.sha256(public_key.read_bytes()).hexdigest()}
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{SITES_FILE}.tmp"
    tmp.write_text(json.dumps(nodes, indent=1, sort_keys=True))
    tmp.replace(state_dir / SITES_FILE)


def read_site_nodes(state_dir: Path) -> dict[str, Any]:
    """node id -> {site, public_key_sha256}, as `coordinator register` recorded them."""
    return _read_json(Path(state_dir) / SITES_FILE)


def list_sites(flwr_home: Path, state_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """`flwr supernode ls`, each node with its site id (None: registered by other means than `register`)."""
    result = subprocess.run([_tool("flwr"), "supernode", "ls", CONNECTION, "--format", "json"], capture_output=True,
                            text=True, timeout=timeout, env=flower_env(flwr_home), cwd=str(flwr_home))
    payload = _last_json(result.stdout)
    if result.returncode != 0 or not payload.get("success"):
        raise DeploymentError(f"flwr supernode ls failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    known = read_site_nodes(state_dir)
    return [{"site": known.get(str(node["node-id"]), {}).get("site"), "node_id": str(node["node-id"]),
             "status": node.get("status"), "online_at": node.get("online-at"), "offline_at": node.get("offline-at")}
            for node in payload.get("nodes", [])]


def read_stop_request(state_dir: Path, run_id: int | str) -> dict[str, Any] | None:
    """The operator's stop request for this run (written by `request_stop`), or None."""
    request = _read_json(Path(state_dir) / STOP_REQUEST)
    return request if request.get("run_id") == str(run_id) else None


def request_stop(flwr_home: Path, state_dir: Path, run_id: int | None = None, wait: float = 60.0
                 ) -> dict[str, Any]:
    """Stop a run on purpose: record the request in the state dir (so the ServerApp audits `run.stop`, not a
    failure), `flwr stop` it, and wait for the ServerApp to mark status.json `stopped`. A ServerApp that is already
    gone cannot: then status.json is marked here, naming that. Returns the final status."""
    status_file = Path(state_dir) / "status.json"
    status = _read_json(status_file)
    if run_id is None:
        if not status.get("run_id"):
            raise ConfigError(f"no run recorded in {status_file}; pass the run id")
        run_id = int(status["run_id"])
    (Path(state_dir) / STOP_REQUEST).write_text(json.dumps({"run_id": str(run_id), "at": time.time()}))
    stop_run(flwr_home, run_id)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = _read_json(status_file)
        if status.get("run_id") != str(run_id) or status.get("state") != "running":
            return status
        time.sleep(0.5)
    status.update(state="stopped", stopped_by="operator", coordinator_acknowledged=False, at=time.time())
    tmp = status_file.with_name(".status.tmp")
    tmp.write_text(json.dumps(status, indent=1, default=str))
    tmp.replace(status_file)
    return status
