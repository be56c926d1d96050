#!/usr/bin/env bash
# Create .venv in the repository root and install the project with everything the demo and the tests need.
#
# torch: on this kind of machine `pip install torch==2.13.0` takes the CPU build that lies on disk; elsewhere
# the usual torch wheel is installed. nnU-Net is installed without `timm` (and so without torchvision):
# timm is only needed by nnU-Net's Primus/EVA architectures, and PyPI's torchvision does not import beside
# the CPU torch build (timm itself does not import without torchvision). With a CUDA torch, timm is added.
# nnU-Net's commands still work without it once `python -m lymphatlas_ds.nnunet_trainers` has run.
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
# Everything else, with the installed torch held where it is (MONAI and TorchIO would otherwise be free to
# pull a newer, CUDA, torch): the project with the torch client and the builder, nnU-Net's other dependencies,
# the MONAI and TorchIO extras (so the interop tests run) and the test tools. The pin is read from the
# installed metadata: importing torch before numpy is installed prints torch's "Failed to initialize NumPy".
TORCH_PIN=$(mktemp)
trap 'rm -f "$TORCH_PIN"' EXIT
python -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > "$TORCH_PIN"
# --no-warn-conflicts: on a rerun pip would report nnU-Net's missing timm here; `pip check` below reports
# every other conflict. PYTHONWARNINGS: setuptools' "Editable installation" note (a reminder that a folder
# named like the package in the working directory wins imports, which is this checkout itself), not a fault.
PYTHONWARNINGS="ignore:Editable installation" pip install --quiet --no-warn-conflicts -c "$TORCH_PIN" \
  -e ".[torch,builder,nnunet-deps,monai,torchio,dev]" 2>&1 | grep -v "is ignored" || true
# nnU-Net and its network package last, without their dependencies (timm and torchvision, see above; the
# rest came with nnunet-deps): with --no-deps pip checks no conflicts, so it does not report timm's absence.
pip install --quiet --no-deps "nnunetv2==2.8.1" "dynamic-network-architectures==0.4.4" 2>&1 | grep -v "is ignored" || true
# timm (nnU-Net's Primus/EVA architectures) needs a torchvision built for the installed torch: where one
# installs and imports (a CUDA torch from PyPI), add both; beside the CPU torch build it does not, so skip.
if python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  pip install --quiet -c "$TORCH_PIN" timm 2>&1 | grep -v "is ignored" || true
  python -c "import timm" 2>/dev/null || { echo "timm does not import beside torch here: removed"; pip uninstall -y -q timm torchvision; }
fi
# Dependency conflicts, less the one this script makes on purpose (dynamic-network-architectures without timm).
pip check 2>&1 | grep -v -E "^dynamic-network-architectures [^ ]+ requires timm|^No broken requirements found" || true
# nnU-Net's own commands (nnUNetv2_train -tr ..., nnUNetv2_predict) find the project's trainers (see the module).
python -m lymphatlas_ds.nnunet_trainers
python -c "import lymphatlas_ds, builder, SimpleITK, pydicom, nnunetv2, torch, monai, torchio; print('environment ready: torch', torch.__version__)"
