#!/usr/bin/env bash
# Create (or update) the project environment in .venv: torch + torchvision, then this package with its
# dev extra. Idempotent: a second run only checks. Used by `make demo`, `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# torch/torchvision: a matching pair must be installed together. On this machine kind, pip is capped at
# torch<=2.14.1 / torchvision<=0.29.1, which lie on local disk; torchvision from the registry does not import
# beside the CPU-only torch 2.13.0 wheel, so we pin the pair that works (a CUDA build that also runs on CPU).
# Override with TORCH_SPEC="torch==X torchvision==Y" on other machines.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC (a few minutes the first time)"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
fi
"$VENV/bin/python" -c "import torch, torchvision" || { echo "[setup] torch/torchvision failed to import" >&2; exit 1; }

STAMP="$VENV/.entmax_vit_installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing entmax-vit and its dependencies (editable, with the dev extra)"
  "${PIP[@]}" install -e ".[dev]" 2>&1 | grep -v -E "^WARNING: Location|BuildBackendWarning|^\s*!!|\*\*\*\*|Please be careful|name as your package|with strategy" || true
  "$VENV/bin/python" -c "import entmax_vit.modeling" || { echo "[setup] entmax_vit failed to import" >&2; exit 1; }
  touch "$STAMP"
fi
echo "[setup] environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
