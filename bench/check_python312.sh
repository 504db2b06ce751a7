#!/usr/bin/env bash
# stele on Python 3.12: build a 3.12 venv the way CI builds its 3.11 one (the exact tested set of
# constraints.txt), collect the whole suite there (every test module imports), then run a few fast
# tests on 3.12. CI itself runs on 3.11; run this when the dependencies change.
#
#   bash bench/check_python312.sh                  # collection, test_dependencies.py, test_layout.py
#   bash bench/check_python312.sh tests/knowledge  # ... and these tests on 3.12 too
#
# PYTHON312 names the interpreter (default python3.12); the venv is cached outside the clone, keyed
# like CI's by pyproject.toml and constraints.txt (STELE_PY312_VENV overrides the path). A fresh
# one downloads the ~5 GB torch stack. Afterwards the 3.11 suite can repeat the collection check:
#   STELE_TEST_PY312=<the venv> .venv/bin/python -m pytest tests/test_dependencies.py
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON312:-python3.12}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  echo "check_python312: $PY is not a working Python 3.12 (set PYTHON312)" >&2
  exit 2
fi
key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
VENV=${STELE_PY312_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/stele-py312/venv-$key}

if [ -f "$VENV/.stele-complete" ]; then
  echo "py312: reusing $VENV"
  "$VENV/bin/pip" install -q --no-deps -e .
else
  echo "py312: creating $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -e '.[dev]' -c constraints.txt
  "$VENV/bin/python" -c "import pipeline, torch, ray.train, torch_geometric, timm" \
    && touch "$VENV/.stele-complete"
fi
"$VENV/bin/python" -c "import sys, torch, ray, transformers; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"

echo "== collection on 3.12"
"$VENV/bin/python" -m pytest --collect-only -q -p no:cacheprovider tests | tail -3

echo "== fast tests on 3.12"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
  tests/test_dependencies.py tests/test_layout.py "$@"
echo "py312: done; the 3.11 suite checks the collection too with STELE_TEST_PY312=$VENV"
