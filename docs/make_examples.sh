#!/usr/bin/env bash
# Make the example outputs of README's "Use a trained model" from a run folder.
#
#   docs/make_examples.sh runs/quickstart            # writes docs/img/...
#   SG2DIST=".venv/bin/sg2dist" docs/make_examples.sh runs/quickstart docs/img
#
# $1: run folder (local or s3://; its latest checkpoint is used)
# $2: output folder (default docs/img). For a conditional model set CLASS=N.
set -euo pipefail

run="${1:?usage: make_examples.sh RUN_FOLDER [OUT_DIR]}"
out="${2:-docs/img}"
sg2dist="${SG2DIST:-sg2dist}"
class_option=()
if [[ -n "${CLASS:-}" ]]; then
    class_option=(--class "$CLASS")
fi
mkdir -p "$out"

# 64 images at truncation 0.7, one 8x8 grid.
$sg2dist generate --checkpoint "$run" "${class_option[@]}" --seeds 0-63 --trunc 0.7 \
    --grid 8x8 "$out/generate-grid.png"

# Rows give the coarse styles (0-3 = the 4 and 8 px layers of a 32 px model), columns the rest.
$sg2dist style-mix --checkpoint "$run" "${class_option[@]}" --rows 85,100,75,458 \
    --cols 55,821,1789,293 --styles 0-3 "$out/style-mix.png"

# A loop through four seeds in W, 24 frames per segment at 24 fps (4 seconds).
$sg2dist interpolate --checkpoint "$run" "${class_option[@]}" --seeds 1,2,3,4 --frames 24 \
    --fps 24 "$out/interpolate.gif"

ls -l "$out/generate-grid.png" "$out/style-mix.png" "$out/interpolate.gif"
