#!/usr/bin/env bash
# Train, evaluate and install the shipped small model, exactly as it was made.
#
#   scripts/train-shipped-model.sh [WORK_DIR]      (default: work/shipped-model)
#
# Needs about 28 GB of disk in WORK_DIR and, on a 2-core CPU, about 3 hours
# (a GPU is used when there is one). Every step prints its progress; an
# interrupted run picks up where it stopped (finished datasets are kept, and
# training resumes from its last epoch). The result replaces
# inference/models/lungsys-small-phantom.safetensors; evaluate.json and the
# ROC curves land in WORK_DIR/eval.
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-work/shipped-model}"
L=.venv/bin/lungsys
mkdir -p "$W"
SECONDS=0

# Training set: 120 patients per class (seed 5); the fresh test set: 25 per class
# (seed 2). Studies of different seeds never share a patient (phantom-set's seeds).
[ -f "$W/train/manifest.csv" ] || \
    $L phantom-set --out "$W/train" --per-class 120 --seed 5 --slices-range 32 48
[ -f "$W/fresh-test/manifest.csv" ] || \
    $L phantom-set --out "$W/fresh-test" --per-class 25 --seed 2 --slices-range 32 48
# More patients for the patient network, which decides from a whole study and had only 288
# to learn from: 120 per class more (seed 7), their test split joined to training; one
# manifest names both sets' studies (patients.csv: 672 to train on, 192 to validate).
[ -f "$W/more/manifest.csv" ] || \
    $L phantom-set --out "$W/more" --per-class 120 --seed 7 --slices-range 32 48
[ -f "$W/patients.csv" ] || .venv/bin/python scripts/patients-manifest.py "$W"

# The slice network on the paper's lung crop, then fine-tuned on the mirrored crop (each
# slice's lung box joined with its mirror image, so that a consolidated lung stays in it:
# docs/localisation.md), then the patient network on its features (of both sets).
$L train slice --data "$W/train" --out "$W/slice.safetensors" --profile small \
    --epochs 36 --optimizer adamw --lr 0.001 --lr-step 24 --batch-size 32 --seed 0 --affine
$L train slice --data "$W/train" --out "$W/slice-mirrored.safetensors" --profile small \
    --epochs 8 --optimizer adamw --lr 0.0002 --lr-step 6 --batch-size 32 --seed 0 --affine \
    --crop mirrored --from-model "$W/slice.safetensors"
$L train patient --data "$W/patients.csv" --slice-model "$W/slice-mirrored.safetensors" \
    --out "$W/model.safetensors" --epochs 40 --optimizer adamw --lr 0.0005 --lr-step 30 \
    --seed 0 --cache-dir "$W/train/.lungsys-cache"

# Every study of the fresh set is unseen: evaluate on all of it, and keep the
# numbers in the checkpoint's metadata.
$L evaluate --model "$W/model.safetensors" --data "$W/fresh-test" --split all \
    --out "$W/eval" --record
cp "$W/model.safetensors" inference/models/lungsys-small-phantom.safetensors
echo "shipped model trained and evaluated in $((SECONDS / 60)) minutes"
