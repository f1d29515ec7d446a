"""Shared fixtures: the real photos in ../shared/data (hash-checked) and scikit-image's astronaut portrait."""
from __future__ import annotations

import csv
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEGAPORTRAIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, with every file in MANIFEST.csv present and matching its sha256; skips when absent."""
    manifest = DATA / "MANIFEST.csv"
    if not manifest.is_file():
        pytest.skip(f"real test photos not found at {DATA} (set MEGAPORTRAIT_DATA)")
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            digest = hashlib.sha256((DATA / row["file"]).read_bytes()).hexdigest()
            assert digest == row["sha256"], f"{row['file']} does not match MANIFEST.csv"
    return DATA


@pytest.fixture(scope="session")
def people(shared_data: Path) -> dict[str, list[Path]]:
    """person name -> sorted photo paths (obama: 4, biden: 2)."""
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted((shared_data / "people").iterdir()) if d.is_dir()}


@pytest.fixture(scope="session")
def templates(shared_data: Path) -> list[Path]:
    """The 10 reference portraits (480x600) across skin-tone strata."""
    return sorted((shared_data / "templates").glob("*.jpg"))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """skimage.data.astronaut(): a real 512x512 RGB portrait shipped with scikit-image."""
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: suites share 2 cores, and more threads spin (measured ~40x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serve_on_loopback():
    """`with serve_on_loopback(app) as port:` an ASGI app served by uvicorn on 127.0.0.1 for the block."""
    return _serve_on_loopback


@contextmanager
def _serve_on_loopback(app):
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields the port, stops it on exit."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
