#!/usr/bin/env bash
# Sets up a checkout from nothing: .venv/ with tagray (editable) and its dev extras,
# pinned by constraints-cpu.txt, and WordNet for nltk in .nltk_data/.
# Used by `make demo` and `make test`; safe to re-run (it skips what is done).
#   CONSTRAINTS=""  bash scripts/setup.sh   # keep the torch your (GPU) image already has
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS-constraints-cpu.txt}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

# Re-install only when the package's requirements change.
stamp="$VENV/.tagray-install-stamp"
want=$(cat pyproject.toml ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing tagray[dev] into $VENV${CONSTRAINTS:+ (constraints: $CONSTRAINTS)}"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e '.[dev]'
  echo "$want" > "$stamp"
fi

bash scripts/setup_system.sh
bash scripts/setup_wordnet.sh "$VENV/bin/python"
echo "[setup] ready: $VENV/bin/tagray"
