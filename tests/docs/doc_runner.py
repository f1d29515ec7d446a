"""Runs the operator docs' marked shell blocks: the doc-test convention of deploy/README.md and deploy/docs/*.md.

A ```bash block right after a `<!-- doctest -->` line runs to completion; one after `<!-- doctest: background -->`
starts a server that runs until the end of its doc (`wait=host:port[,host:port]` in the marker names what to wait
for; without it the block's `--listen host:port` / `--port N` is waited for). Each doc runs in its own temporary
tree: `/etc/megaportrait`, `/var/lib/megaportrait` and `/srv/megaportrait` become folders there, the documented
ports become free ones, and `/opt/megaportrait` (the release) holds this checkout's venv and policies and a copy of
`deploy/` with the same substitutions (so a file the doc copies out of it points into the tree too). Blocks run in
order in one working folder, where `deploy/` and `policies/` are the release's; variables a block sets reach the
next ones. test_operator_docs.py runs each doc; a doc that needs other roles' steps first (site-client.md: the PKI
and a render node) has its own test, which runs those steps and the doc's blocks through this same runner.
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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^\s*<!--\s*doctest(?::\s*(?P<kind>background)(?P<opts>[^>]*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")
# Every port an operator doc names: each becomes a free port in the temporary tree.
DOC_PORTS = (9093, 9094, 9098, 9099, 9194, 9199, 9464, 9465, 9466, 50051, 8088, 8089)
TEXT_SUFFIXES = {".yaml", ".yml", ".toml", ".env", ".service", ".timer", ".sh", ".md", ".json", ""}


@dataclass(frozen=True)
class DocBlock:
    """One marked ```bash block: its doc, the line its code starts on, the code, and how to run it."""

    doc: Path
    line: int
    code: str
    background: bool = False
    wait: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def extract_blocks(doc: Path) -> list[DocBlock]:
    """The marked blocks of one Markdown file, in order. A marker not followed by a ```bash fence is an error."""
    lines = doc.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if not marker:
            i += 1
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None or fence["lang"] != "bash":
            raise ValueError(f"{doc}:{i + 1}: doctest marker not followed by a ```bash block")
        indent, body, j = fence["indent"], [], i + 2
        while j < len(lines) and not re.match(rf"^{indent}```\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{doc}:{i + 2}: unterminated ```bash block")
        opts = dict(o.split("=", 1) for o in (marker["opts"] or "").split() if "=" in o)
        waits = tuple(w for w in opts.get("wait", "").split(",") if w)
        blocks.append(DocBlock(doc, i + 3, "\n".join(body) + "\n", marker["kind"] == "background", waits))
        i = j + 1
    return blocks


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DocTree:
    """The temporary tree one doc runs in, and the substitutions that put the doc's paths and ports there."""

    root: Path
    ports: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for sub in ("etc", "var", "srv", "opt", "work", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.ports = {port: free_port() for port in DOC_PORTS}
        # /opt/megaportrait, the release: this checkout's venv and policies, and deploy/ with the substitutions.
        self._copy_substituted(REPO / "deploy", self.root / "opt" / "deploy")
        for name in (".venv", "policies"):
            (self.root / "opt" / name).symlink_to(REPO / name)
        for name in ("deploy", "policies"):  # the docs' relative `deploy/...` means the release's
            (self.work / name).symlink_to(self.root / "opt" / name)

    @property
    def work(self) -> Path:
        return self.root / "work"

    def substitute(self, text: str) -> str:
        for real, here in (("/etc/megaportrait", self.root / "etc"), ("/var/lib/megaportrait", self.root / "var"),
                           ("/srv/megaportrait", self.root / "srv"), ("/opt/megaportrait", self.root / "opt")):
            text = text.replace(real, str(here))
        return re.sub(r"(?<![\d.])(" + "|".join(map(str, self.ports)) + r")(?!\d)",
                      lambda m: str(self.ports[int(m[1])]), text)

    def _copy_substituted(self, src: Path, dest: Path) -> None:
        for path in sorted(src.rglob("*")):
            target = dest / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path.suffix in TEXT_SUFFIXES or path.name.endswith(".dockerignore"):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(self.substitute(path.read_text()))
                shutil.copymode(path, target)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGAPORTRAIT_", "FLWR_"))}
        env.update(HOME=str(self.root / "home"), OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
                   PATH=os.pathsep.join([str(REPO / ".venv" / "bin"), env.get("PATH", "")]),
                   PYTHONWARNINGS="ignore", COLUMNS="200")
        return env


@dataclass
class BlockFailure(AssertionError):
    block: DocBlock
    message: str

    def __str__(self) -> str:
        return f"{self.block.where}: {self.message}\n--- block ---\n{self.block.code}"


@dataclass
class DocRun:
    """Runs one doc's blocks in order; `close` stops its background servers (whole process groups)."""

    tree: DocTree
    block_timeout: float = 420.0
    wait_timeout: float = 120.0
    background: list[tuple[DocBlock, subprocess.Popen, Path]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)

    @property
    def env_file(self) -> Path:
        return self.tree.root / "doc.env"

    def _script(self, block: DocBlock) -> str:
        state = shlex.quote(str(self.env_file))
        return (f"set -euo pipefail -a\n[ -f {state} ] && . {state}\n{self.tree.substitute(block.code)}\n"
                f"export -p > {state}\n")

    def run(self, block: DocBlock) -> str:
        """Runs one block; returns what a foreground block printed (stdout and stderr), "" for a server."""
        started = time.monotonic()
        output = ""
        if block.background:
            self._start(block)
        else:
            log = self.tree.root / f"block-{block.line}.log"
            with open(log, "wb") as out:
                try:
                    rc = subprocess.run(["bash", "-c", self._script(block)], cwd=self.tree.work, env=self.tree.env(),
                                        stdout=out, stderr=subprocess.STDOUT, timeout=self.block_timeout,
                                        start_new_session=True).returncode
                except subprocess.TimeoutExpired:
                    rc = None
            if rc != 0:
                what = "timed out" if rc is None else f"exit {rc}"
                raise BlockFailure(block, f"{what}\n--- output ---\n{log.read_text(errors='replace')[-4000:]}"
                                   + self._server_logs())
            output = log.read_text(errors="replace")
        self.timings.append((block.where, time.monotonic() - started))
        return output

    def _start(self, block: DocBlock) -> None:
        log = self.tree.root / f"server-{block.line}.log"
        script = self._script(block).replace("set -euo pipefail -a\n", "set -eu -a\n")
        with open(log, "wb") as out:
            popen = subprocess.Popen(["bash", "-c", script], cwd=self.tree.work, env=self.tree.env(), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((block, popen, log))
        targets = [self.tree.substitute(w) for w in block.wait] or self._listen_targets(block)
        if not targets:
            raise BlockFailure(block, "background block names nothing to wait for (wait=host:port, --listen, --port)")
        deadline = time.monotonic() + self.wait_timeout
        for target in targets:
            host, _, port = target.rpartition(":")
            while not _connects(host or "127.0.0.1", int(port)):
                if popen.poll() is not None:
                    raise BlockFailure(block, f"exited ({popen.returncode}) before listening on {target}\n"
                                       + log.read_text(errors="replace")[-4000:])
                if time.monotonic() > deadline:
                    raise BlockFailure(block, f"nothing listens on {target} after {self.wait_timeout:.0f} s\n"
                                       + log.read_text(errors="replace")[-4000:])
                time.sleep(0.3)

    def _listen_targets(self, block: DocBlock) -> list[str]:
        code = self.tree.substitute(block.code)
        found = re.findall(r"--listen[ =](\S+:\d+)", code) or [f"127.0.0.1:{p}" for p in
                                                                re.findall(r"--port[ =](\d+)", code)]
        return [t.replace("0.0.0.0", "127.0.0.1") for t in found]

    def _server_logs(self) -> str:
        return "".join(f"\n--- server {b.where} ---\n{log.read_text(errors='replace')[-1500:]}"
                       for b, _, log in self.background)

    def close(self) -> None:
        for _, popen, _ in reversed(self.background):
            _signal_group(popen, signal.SIGTERM)
            try:
                popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(popen, signal.SIGKILL)
            popen.wait(timeout=10)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _connects(host: str, port: int) -> bool:
    with closing(socket.socket()) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def operator_docs() -> list[Path]:
    return [REPO / "deploy" / "README.md", *sorted((REPO / "deploy" / "docs").glob("*.md"))]


def leftover_processes(home: Path, grace: float = 20.0) -> list[str]:
    """Processes still running with this tree's HOME (everything a doc started inherits it) once `grace` seconds
    have passed: they are killed and named. The grace is for what a server ends after it has exited itself (the
    SuperLink gives its flower-superexec 1 s, then leaves it to finish on its own)."""
    import psutil

    def running() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("HOME") == str(home):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    deadline = time.monotonic() + grace
    while (procs := running()) and time.monotonic() < deadline:
        time.sleep(0.5)
    named = []
    for proc in procs:
        try:
            named.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    return named
