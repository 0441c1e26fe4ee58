#!/usr/bin/env bash
# Create .venv with PyTorch (CPU-capable build from the local wheel cache) and qrobust.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --test   # plus test/peer dependencies (pytest, ruff, ART, torchattacks) and MkDocs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python - <<'PYEOF' || python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
import importlib.util, sys
sys.exit(0 if importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision") else 1)
PYEOF
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test,docs]"   # docs: mkdocs + Material + mkdocstrings (tests/test_docs.py)
  # torchattacks pins requests~=2.25; it needs nothing beyond torch/numpy/scipy, so skip its pins.
  python -m pip install -q --no-deps "torchattacks==3.5.1"
  # CleverHans 4 (benchmarks/bench_cw.py, tests/test_cw.py): its torch attacks need only torch.
  python -m pip install -q --no-deps "cleverhans==4.0.0"
else
  python -m pip install -q -e .
fi
python -c "import qrobust, torch; print('qrobust', qrobust.__version__, 'torch', torch.__version__)"
