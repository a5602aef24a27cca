#!/usr/bin/env bash
# Set up llama4x for development: a virtualenv, torch, and `pip install -e ".[dev,demo]"`. Idempotent, fast on re-run.
#
#   bash scripts/setup.sh            # then: .venv/bin/llama4x demo   /   .venv/bin/python -m pytest -q
#   bash scripts/setup.sh --force    # reinstall llama4x even if the last install is up to date
#
# Where it installs:
#   - an active virtualenv ($VIRTUAL_ENV) if there is one; `.venv` in the repo root is then made a symlink to it
#     (when no `.venv` exists yet) so the `.venv/bin/...` commands in the README work unchanged;
#   - otherwise `.venv` in the repo root, created with $PYTHON (default: python3, must be >= 3.10). If that
#     interpreter can already import torch, the venv gets --system-site-packages so that torch (e.g. a CUDA build)
#     is reused instead of downloaded again.
# Torch: kept as is if importable; only when none is importable does this install torch==2.13.0 (pip picks the wheel
# from your pip configuration / index).
set -euo pipefail

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option: $arg (accepted: --force, --help)" >&2; exit 2 ;;
    esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
TORCH_VERSION="2.13.0"
say() { echo "[setup] $*"; }

# 1. The environment.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
    [[ -x "$PY" ]] || { echo "setup.sh: VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python" >&2; exit 1; }
    say "using the active virtualenv $VIRTUAL_ENV"
    if [[ ! -e .venv ]]; then
        ln -s "$VIRTUAL_ENV" .venv
        say "linked .venv -> $VIRTUAL_ENV"
    elif [[ "$(cd .venv && pwd -P)" != "$(cd "$VIRTUAL_ENV" && pwd -P)" ]]; then
        say "note: .venv is a different environment; run llama4x / pytest from the active one, not .venv/bin"
    fi
elif [[ -x .venv/bin/python ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
    say "reusing $REPO_ROOT/.venv"
else
    BASE_PY="${PYTHON:-python3}"
    command -v "$BASE_PY" >/dev/null || { echo "setup.sh: $BASE_PY not found; set PYTHON=/path/to/python3.10+" >&2; exit 1; }
    "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "setup.sh: $("$BASE_PY" -V 2>&1) is too old; llama4x needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }
    VENV_FLAGS=()
    if "$BASE_PY" -c 'import torch' >/dev/null 2>&1; then
        VENV_FLAGS+=(--system-site-packages)
        say "$BASE_PY already has torch; creating .venv with --system-site-packages to reuse it"
    fi
    "$BASE_PY" -m venv "${VENV_FLAGS[@]}" .venv \
        || { echo "setup.sh: '$BASE_PY -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
    PY="$REPO_ROOT/.venv/bin/python"
    say "created $REPO_ROOT/.venv with $("$PY" -V 2>&1)"
fi

# 2. Torch: keep any importable torch; install the pinned CPU-default version only when there is none.
if TORCH_FOUND="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    say "keeping the installed torch $TORCH_FOUND"
else
    say "no torch found; installing torch==$TORCH_VERSION"
    "$PY" -m pip install "torch==$TORCH_VERSION"
fi

# 3. llama4x itself (editable) with the dev and demo extras. Skipped when the last successful install was from this
# checkout and pyproject.toml has not changed since (the stamp lives inside the environment).
STAMP_FILE="$("$PY" -c 'import sys; print(sys.prefix)')/.llama4x-setup-stamp"
STAMP="$("$PY" - "$REPO_ROOT" <<'EOF'
import hashlib, sys
root = sys.argv[1]
with open(f"{root}/pyproject.toml", "rb") as f:
    print(root, hashlib.sha256(f.read()).hexdigest())
EOF
)"
installed_here() {
    "$PY" - "$REPO_ROOT" <<'EOF'
import json, os, sys
from importlib.metadata import PackageNotFoundError, distribution
try:
    text = distribution("llama4x").read_text("direct_url.json")
except PackageNotFoundError:
    sys.exit(1)
info = json.loads(text or "{}")
url = info.get("url", "")
editable = info.get("dir_info", {}).get("editable", False)
sys.exit(0 if editable and os.path.realpath(url.removeprefix("file://")) == os.path.realpath(sys.argv[1]) else 1)
EOF
}
if [[ "$FORCE" == 0 && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]] && installed_here; then
    say "llama4x is already installed (editable, from this checkout, pyproject.toml unchanged); skipping pip"
else
    say "installing llama4x (editable) with the dev and demo extras (demo: scikit-learn, for the digits data)"
    "$PY" -m pip install -e ".[dev,demo]"
    echo "$STAMP" > "$STAMP_FILE"
fi

say "done: $("$PY" -c 'import importlib.metadata as m; print("llama4x", m.version("llama4x"), "| torch", m.version("torch"), "| transformers", m.version("transformers"))')"
say "next: .venv/bin/llama4x demo   or   .venv/bin/python -m pytest -q"
