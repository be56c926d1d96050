#!/usr/bin/env bash
# Create .venv in the repository root and install the project with everything the demo and the tests need.
#
# torch: on this kind of machine `pip install torch==2.13.0` takes the CPU build that lies on disk; elsewhere
# the usual torch wheel is installed. nnU-Net is installed without `timm` (and so without torchvision):
# timm is only needed by nnU-Net's Primus/EVA architectures, and PyPI's torchvision does not import beside
# the CPU torch build. The project drives nnU-Net through its Python API (see lymphatlas_ds/nnunet.py and
# tools/), which never imports those architectures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet "torch==2.13.0" 2>&1 | grep -v "is ignored" || pip install --quiet torch
fi
# nnU-Net and its network package without their torch-vision-pulling extras (see above).
pip install --quiet --no-deps "nnunetv2==2.8.1" "dynamic-network-architectures==0.4.4" 2>&1 | grep -v "is ignored" || true
pip install --quiet -e ".[builder,nnunet-deps,dev]" 2>&1 | grep -v "is ignored" || true
python -c "import lymphatlas_ds, SimpleITK, pydicom, nnunetv2, torch; print('environment ready: torch', torch.__version__)"
