"""Logging setup and the one rule of what may be logged: records by hash, never personal data."""
from __future__ import annotations

import hashlib
import logging
import re

from rich.logging import RichHandler


def configure_logging(level: str = "INFO") -> None:
    """Route the `megaportrait` logger through rich; idempotent."""
    logger = logging.getLogger("megaportrait")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
    logger.setLevel(level)


def short_hash(data: bytes | str, n: int = 12) -> str:
    """A short sha256 hex prefix to name a record in logs without revealing it."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:n]


# Third-party lines that say nothing to an operator: shown only with `megaportrait --verbose`.
THIRD_PARTY_NOISE = re.compile(
    r"MessageFactory.*GetPrototype"  # protobuf >= 4 against mediapipe's generated code
    r"|TensorFlow Lite XNNPACK delegate|absl::InitializeLog\(\)"  # TF Lite / absl start-up
    r"|^[WIE]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\]"  # absl/glog lines from mediapipe's graphs
    r"|setPreferableTarget|^\[ WARN:\d"  # OpenCV DNN
    r"|Started a local Ray instance"  # Ray's start-up line
    r"|mediapipe/python/solution_base\.py:\d+: DeprecationWarning|^\s+self\._modify_calculator_options\("
)
_quiet: dict = {}


class _LineFilter:
    """A text stream that drops whole lines matching THIRD_PARTY_NOISE and passes everything else on."""

    def __init__(self, stream) -> None:
        self._stream, self._partial = stream, ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        kept = [ln for ln in lines if not THIRD_PARTY_NOISE.search(ln)]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        if self._partial and not THIRD_PARTY_NOISE.search(self._partial) and len(self._partial) > 4096:
            self._stream.write(self._partial)
            self._partial = ""
        return len(text)

    def flush(self) -> None:
        # a progress bar's line has no newline yet: it goes out now, unless it may be the start of a noise line
        if self._partial and not self._partial.startswith("AttributeError"):
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def quiet_third_party() -> None:
    """Keep third-party start-up chatter (protobuf's GetPrototype error, TF Lite/absl/XNNPACK lines, OpenCV's
    setPreferableTarget warnings, Ray's start-up line) off the terminal; idempotent. Native libraries write to file
    descriptor 2 directly, so fd 2 goes through a filtering thread; Python's own `sys.stderr` keeps the terminal
    (progress bars still see a TTY). Only when stderr is a real file descriptor (not under a test runner's capture).
    `show_third_party()` undoes it."""
    import os
    import sys
    import threading

    if _quiet:
        return
    root = logging.getLogger()
    if not root.handlers:  # Opacus calls logging.basicConfig at import: every library's INFO would reach the terminal
        root.addHandler(logging.NullHandler())
    for name, value in (("OPENCV_LOG_LEVEL", "ERROR"), ("GLOG_minloglevel", "2"), ("TF_CPP_MIN_LOG_LEVEL", "2"),
                        ("PYTHONWARNINGS", "ignore::DeprecationWarning")):  # child processes too (Ray's workers)
        os.environ.setdefault(name, value)
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    import io

    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    original = sys.stderr
    sys.stderr = _LineFilter(io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True,
                                              encoding=original.encoding or "utf-8", errors="backslashreplace"))

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as src:
            out = _LineFilter(io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True,
                                               encoding="utf-8", errors="backslashreplace"))
            buf = b""
            while chunk := src.read(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    out.write(line.decode("utf-8", "backslashreplace") + "\n")
            if buf:
                out.write(buf.decode("utf-8", "backslashreplace"))
            out.flush()

    thread = threading.Thread(target=pump, name="megaportrait-stderr-filter", daemon=True)
    thread.start()
    _quiet.update(saved=saved, original=original, thread=thread)
    import atexit

    atexit.register(show_third_party)


def show_third_party() -> None:
    """Undo `quiet_third_party`: fd 2 and `sys.stderr` are the terminal again (what was filtered stays dropped)."""
    import os
    import sys

    if not _quiet:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(_quiet["saved"], 2)  # the pipe's last writer goes: the filter thread drains it and ends
    _quiet["thread"].join(timeout=2)
    os.close(_quiet["saved"])
    sys.stderr = _quiet["original"]
    _quiet.clear()
