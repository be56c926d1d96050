#!/usr/bin/env bash
# GPU check of the nnU-Net baseline on a single-GPU Linux machine with PyTorch + CUDA and no network
# (about 4-6 minutes): install what is missing from a folder of wheels, make a small cohort, build a
# release, run a short real training of fold 0 on CUDA, validate, predict the test split, write the report.
#
#   bash tools/gpu_check.sh [WHEELS_DIR] [WORK_DIR]
#
# WHEELS_DIR (default ./wheels): wheels for the packages the machine lacks; nothing is downloaded here.
# tools/README.md says how to prepare it with `pip download` on a machine with network access.
# WORK_DIR (default ./gpu_check): cohort, release, nnU-Net folders; the report is WORK_DIR/nn/results/README.md.
# Knobs (environment): EPOCHS (10), ITERATIONS (50 per epoch), PATIENTS (16), SHAPE ("64,96,96"),
# PYTHON (python3), NP (8 processes for preprocessing and augmentation), DEVICE (cuda; "cpu" only to try
# the script itself on a machine without a GPU, with tiny EPOCHS / ITERATIONS / SHAPE).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
WORK=$(mkdir -p "${2:-gpu_check}" && cd "${2:-gpu_check}" && pwd)
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-10} ITERATIONS=${ITERATIONS:-50} PATIENTS=${PATIENTS:-16} SHAPE=${SHAPE:-64,96,96} NP=${NP:-8}
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

stamp "1/4 environment"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == 'cpu' else 3)" "$DEVICE" \
  || { echo "error: torch sees no CUDA GPU here; this check needs one" >&2; exit 3; }
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi
# module -> distribution; only what is missing is installed (into WORK/site, nothing else is touched)
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"nnunetv2": "nnunetv2", "dynamic_network_architectures": "dynamic_network_architectures",
        "batchgenerators": "batchgenerators", "batchgeneratorsv2": "batchgeneratorsv2", "acvl_utils": "acvl_utils",
        "SimpleITK": "simpleitk", "nibabel": "nibabel", "blosc2": "blosc2", "ndindex": "ndindex",
        "numexpr": "numexpr", "cc3d": "connected_components_3d", "datasets": "datasets", "dill": "dill",
        "multiprocess": "multiprocess", "pyarrow": "pyarrow", "scipy": "scipy", "skimage": "scikit_image",
        "sklearn": "scikit_learn", "pandas": "pandas", "matplotlib": "matplotlib", "seaborn": "seaborn",
        "tqdm": "tqdm", "huggingface_hub": "huggingface_hub", "einops": "einops", "tifffile": "tifffile",
        "requests": "requests", "msgpack": "msgpack", "threadpoolctl": "threadpoolctl"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
SITE="$WORK/site"
if [ -n "$missing" ]; then
  echo "missing here: $missing"
  files=()
  for dist in $missing; do
    f=$(ls "$WHEELS"/*.whl 2>/dev/null | while read -r w; do b=$(basename "$w" | tr 'A-Z' 'a-z'); case "$b" in "$dist"-*) echo "$w";; esac; done | head -1)
    [ -n "$f" ] || { echo "error: no wheel for '$dist' in $WHEELS; prepare the folder as tools/README.md says" >&2; exit 4; }
    files+=("$f")
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${files[@]}"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 nnUNet_compile=false LYMPHATLAS_CACHE="$WORK/cache"

stamp "2/4 cohort and release ($PATIENTS patients, shape $SHAPE)"
rm -rf "$WORK/work" "$WORK/lymphatlas"
"$PY" - "$WORK" "$PATIENTS" "$SHAPE" <<'PYEOF'
import sys
from pathlib import Path
from builder.release.build import build_release
from lymphatlas_synth.fake_work import make_fake_work
work, n, shape = Path(sys.argv[1]), int(sys.argv[2]), tuple(int(v) for v in sys.argv[3].split(","))
cases = make_fake_work(work / "work", n_patients=n, seed=11, shape_zyx=shape)
summary = build_release(work / "work", work / "lymphatlas", version="1.0.0")
print(f"{len(cases)} cases of {n} patients -> release {summary.version} at {summary.path}")
PYEOF

stamp "3/4 materialize, plan+preprocess, train fold 0 on $DEVICE ($EPOCHS epochs x $ITERATIONS iterations), validate, predict test"
set +e
"$PY" tools/train_baseline.py --source "$WORK/lymphatlas" --work "$WORK/nn" --configs all --folds 0 \
  --trainer nnUNetTrainer --epochs "$EPOCHS" --iterations "$ITERATIONS" --val-iterations 10 --device "$DEVICE" \
  --np "$NP" --da-workers "$NP" --force --quiet 2>&1 | tee "$WORK/train.log" \
  | grep -E "Epoch time|Pseudo dice|Mean Validation Dice|Using splits|This split has|results:|Error|error"
status=${PIPESTATUS[0]}
set -e
[ "$status" = 0 ] || { tail -30 "$WORK/train.log"; echo "error: training failed; see $WORK/train.log" >&2; exit 5; }

stamp "4/4 report"
cat "$WORK/nn/results/README.md"
stamp "done: $WORK/nn/results"
