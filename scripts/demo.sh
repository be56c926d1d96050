#!/usr/bin/env bash
# The main job, end to end on a synthetic cohort (no network, CPU only):
#   synthesize DICOM -> convert to aligned cases -> QC report -> release 1.0.0 -> local mirror
#   -> load with plain `datasets` and with torch -> nnU-Net v2 raw dataset
#   -> update release 1.1.0 with new exams (published cases keep their folds).
# Everything is written under ./demo (ignored by git). Usage: bash scripts/demo.sh [N_EXAMS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
N=${1:-12}
D=demo
rm -rf "$D"
mkdir -p "$D"
echo "== 1. synthetic cohort: $N exams (+4 more for the update release)"
# --variants all: every vendor convention, head/feet first, decay-correction and timing variant, compressed
# transfer syntaxes, extra series, SEG masks, and three broken exams that convert must reject.
python -m builder synth "$D/source" --exams "$N" --seed 7 --size small --truth "$D/truth" --variants all
python -m builder synth "$D/source-update" --exams $((N + 4)) --seed 7 --size small --truth "$D/truth-update" --variants all
echo "== 2. convert DICOM -> aligned cases (registration, SUV, labels, QC, de-identification)"
python -m builder convert "$D/source" "$D/work" --workers 2 || [ $? -eq 1 ]
echo "== 3. QC report: $D/work/qc/index.html"
python -m builder report "$D/work"
echo "== 4. release 1.0.0 and the local mirror"
python -m builder release "$D/work" "$D/release-1.0.0/lymphatlas" --version 1.0.0
python -m builder publish "$D/release-1.0.0/lymphatlas" --mirror "$D/mirror"
echo "== 5. load it: plain datasets, then torch"
python scripts/demo_load.py "$D/release-1.0.0"
echo "== 6. nnU-Net v2 raw dataset with the patient-grouped splits"
lymphatlas materialize "$D/mirror" --nnunet "$D/nnUNet_raw" --version 1.0.0 --config all --dataset-id 501
echo "== 7. update release 1.1.0: the cohort grew; nothing published moves"
# exit status 1 = some exams were rejected (listed above and in failures.json); anything else is an error
python -m builder convert "$D/source-update" "$D/work" --workers 2 || [ $? -eq 1 ]
python -m builder release "$D/work" "$D/release-1.1.0/lymphatlas" --version 1.1.0 --previous "$D/mirror/1.0.0"
python -m builder publish "$D/release-1.1.0/lymphatlas" --mirror "$D/mirror"
lymphatlas info "$D/mirror"
lymphatlas verify "$D/mirror" --version 1.0.0
lymphatlas verify "$D/mirror" --version 1.1.0
echo "demo finished: see $D/ (QC report $D/work/qc/index.html, mirror $D/mirror, nnU-Net $D/nnUNet_raw)"
