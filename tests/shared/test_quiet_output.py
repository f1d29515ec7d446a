"""Third-party start-up noise is kept off the terminal by default and shown with `--verbose`: native lines written
to file descriptor 2 and Python-level ones, in a real child process; everything else passes through unchanged."""
from __future__ import annotations

import subprocess
import sys

NOISE = [
    "W0000 00:00:1796401043.585490    7055 inference_feedback_manager.cc:114] Feedback manager requires a model",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "[ WARN:0@0.272] global net_impl_backend.cpp:345 setPreferableTarget Targets are not supported",
    "2026-12-04 16:20:00,000\tINFO worker.py:1832 -- Started a local Ray instance.",
]
SCRIPT = """
import os, sys
{setup}
for line in {noise!r}:
    os.write(2, (line + "\\n").encode())
sys.stderr.write("AttributeError"); sys.stderr.write(": "); sys.stderr.write("'MessageFactory' object has no attribute 'GetPrototype'"); sys.stderr.write("\\n")
os.write(2, b"native: a real warning\\n")
print("python: a real error", file=sys.stderr)
"""


def _run(setup: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup, noise=NOISE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_noise_is_hidden_by_default_and_the_rest_kept():
    err = _run("from megaportrait.shared.logs import quiet_third_party; quiet_third_party()")
    assert "native: a real warning" in err and "python: a real error" in err
    assert not any(line.split("]")[0][:30] in err for line in NOISE) and "GetPrototype" not in err, err


def test_verbose_shows_everything():
    err = _run("")  # `megaportrait --verbose` installs no filter
    assert all(line in err for line in NOISE) and "GetPrototype" in err


LIBRARY_INFO = """
import logging
{setup}
import opacus.utils.module_utils  # calls logging.basicConfig at import
logging.getLogger("flwr.simulation").info("library: round 1 configured")
logging.getLogger("flwr").warning("library: a warning")
"""


def _run_library(setup: str) -> str:
    proc = subprocess.run([sys.executable, "-c", LIBRARY_INFO.format(setup=setup)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_library_that_calls_basicconfig_does_not_put_its_logs_on_the_terminal():
    quiet = _run_library("from megaportrait.shared.logs import quiet_third_party; quiet_third_party()")
    assert "library:" not in quiet, quiet
    loud = _run_library("")  # --verbose: Opacus' root handler stays, and the library's lines reach the terminal
    assert "library: a warning" in loud, loud
