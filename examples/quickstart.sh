#!/usr/bin/env bash
# The main job on a small built-in example: synthesize → tile → train → eval → report.
# Usage: examples/quickstart.sh [WORKDIR]   (default: ./hiresctl-demo)
# About four minutes on 2 CPU cores. The data is `fine-detail`: a 32² patch of one-pixel
# checkerboard (class 1) or of flat grey with the same mean (class 0) somewhere in 512² noise,
# so only full resolution tells the classes apart; the recipe is recipes/cls-demo-patchgd-global.yaml.
# Two runs are trained (PatchGD + global patch, and the downsampled baseline with the same
# backbone) and the report puts them side by side: $WORKDIR/report/report.html.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-hiresctl-demo}"
mkdir -p "$work"
echo "== synthesize 200 fine-detail images (512²) into $work/synth"
hiresctl synth fine-detail "$work/synth" --count 200 --size 512 --seed 0
echo "== tile them into the dataset store $work/dataset.zarr"
hiresctl tile "$work/synth/images" --labels "$work/synth/labels.csv" --out "$work/dataset.zarr"
hiresctl info "$work/dataset.zarr"
echo "== train PatchGD + global patch (tiny CNN, 64² patches) into $work/run-patchgd-global"
rm -rf "$work/run-patchgd-global" "$work/run-downsample"
hiresctl train --task cls --data "$work/dataset.zarr" --recipe "$here/recipes/cls-demo-patchgd-global.yaml" \
  --out "$work/run-patchgd-global"
echo "== train the downsampled baseline (the same CNN on the image resized to 64²) into $work/run-downsample"
hiresctl train --task cls --data "$work/dataset.zarr" --recipe "$here/recipes/cls-demo-patchgd-global.yaml" \
  --method downsample --out "$work/run-downsample"
echo "== evaluate both on the test split and write the report"
hiresctl eval "$work/run-patchgd-global" "$work/run-downsample" --data "$work/dataset.zarr" --split test \
  --report --out "$work/report"
echo "open $work/report/report.html (Markdown: $work/report/report.md, numbers: $work/report/metrics.json)"
