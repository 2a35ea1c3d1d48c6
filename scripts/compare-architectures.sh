#!/usr/bin/env bash
# Train the seeds' other architectures as the shipped model was trained, and compare them
# with it on the same fresh test set: the README's comparison table.
#
#   scripts/compare-architectures.sh [WORK_DIR]      (default: work/compare)
#
# The datasets are the shipped model's (scripts/train-shipped-model.sh: training set seed
# 5, 120 patients a class more for the patient networks (seed 7), fresh test set seed 2,
# studies of 32-48 slices); Hu 2020 and LA-DNN are trained on them with the shipped
# model's settings (their small profiles), the dual-sampling network (no patient network of
# its own) on the training set with `lungsys train volume` (VOLUME_EPOCHS, lr 1e-3 x0.1
# every 8 epochs, 8 volumes a batch),
# then `lungsys evaluate` compares them all on every study of the fresh set and writes
# WORK_DIR/comparison.txt and WORK_DIR/eval/comparison.md (the README's table). About
# 5 hours on a 2-core CPU (a GPU is used when there is one); an interrupted run resumes.
# PER_CLASS, TEST_PER_CLASS, SLICE_EPOCHS, PATIENT_EPOCHS and VOLUME_EPOCHS shrink it;
# ARCHS names the architectures trained (default "hu2020 ladnn dualsampling"; add m3 to
# train M3 the same way too, hu2020-schedule for Hu 2020 with its paper's own schedule: Adam
# with beta 0.5/0.9, its focal loss, each level's classifier for the first half of the
# epochs, early stopping), SHIPPED=0 leaves the shipped model out of the table, and
# TRAIN_ONLY=1 stops before the evaluation (with cores to spare, two runs with different
# ARCHS may then train side by side; on 2 cores they only slow each other down; a last
# run without it compares them all).
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-work/compare}"
L=.venv/bin/lungsys
PER_CLASS="${PER_CLASS:-120}"
TEST_PER_CLASS="${TEST_PER_CLASS:-25}"
SLICE_EPOCHS="${SLICE_EPOCHS:-36}"
PATIENT_EPOCHS="${PATIENT_EPOCHS:-40}"
VOLUME_EPOCHS="${VOLUME_EPOCHS:-24}"
ARCHS="${ARCHS:-hu2020 ladnn dualsampling}"
mkdir -p "$W"
SECONDS=0

[ -f "$W/train/manifest.csv" ] || \
    $L phantom-set --out "$W/train" --per-class "$PER_CLASS" --seed 5 --slices-range 32 48
[ -f "$W/fresh-test/manifest.csv" ] || \
    $L phantom-set --out "$W/fresh-test" --per-class "$TEST_PER_CLASS" --seed 2 \
        --slices-range 32 48
# the patient networks learn from these patients and as many more (seed 7), as the
# shipped model's did
[ -f "$W/more/manifest.csv" ] || \
    $L phantom-set --out "$W/more" --per-class "$PER_CLASS" --seed 7 --slices-range 32 48
[ -f "$W/patients.csv" ] || .venv/bin/python scripts/patients-manifest.py "$W"

models=()
[ "${SHIPPED:-1}" = 0 ] || models+=(inference/models/lungsys-small-phantom.safetensors)
for arch in $ARCHS; do
    if [ "$arch" = dualsampling ]; then
        [ -f "$W/$arch.safetensors" ] || \
            $L train volume --arch "$arch" --data "$W/train" --out "$W/$arch.safetensors" \
                --profile small --epochs "$VOLUME_EPOCHS" --lr 0.001 --lr-step 8 \
                --batch-size 8 --seed 0
        models+=("$W/$arch.safetensors")
        continue
    fi
    schedule=(--optimizer adamw)
    [ "$arch" != hu2020-schedule ] || schedule=(--optimizer adam --betas 0.5 0.9 --focal \
        --level-epochs $((SLICE_EPOCHS / 2)) --early-stop 2)
    [ -f "$W/$arch.safetensors" ] || {
        $L train slice --arch "${arch%-schedule}" --data "$W/train" \
            --out "$W/$arch-slice.safetensors" --profile small --epochs "$SLICE_EPOCHS" \
            "${schedule[@]}" --lr 0.001 --lr-step 24 --batch-size 32 --seed 0 --affine
        $L train patient --data "$W/patients.csv" --slice-model "$W/$arch-slice.safetensors" \
            --out "$W/$arch.safetensors" --epochs "$PATIENT_EPOCHS" --optimizer adamw \
            --lr 0.0005 --lr-step 30 --seed 0 --cache-dir "$W/train/.lungsys-cache"
    }
    models+=("$W/$arch.safetensors")
done

[ "${TRAIN_ONLY:-0}" = 0 ] || { echo "trained in $((SECONDS / 60)) minutes: ${models[*]}"; exit 0; }
args=()
for m in "${models[@]}"; do args+=(--model "$m"); done
$L evaluate "${args[@]}" --data "$W/fresh-test" --split all --out "$W/eval" \
    | tee "$W/comparison.txt"
echo "architectures trained and compared in $((SECONDS / 60)) minutes: $W/comparison.txt"
