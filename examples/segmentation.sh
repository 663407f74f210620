#!/usr/bin/env bash
# Segmentation end to end on a small built-in example: synthesize → tile (with masks) → train
# PatchGD + global patch and the downsample baseline → eval both → predict masks as NGFF labels.
# Usage: examples/segmentation.sh [WORKDIR]   (default: ./hiresctl-seg-demo); a few minutes on 2 CPU cores.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-hiresctl-seg-demo}"
mkdir -p "$work"
echo "== synthesize 40 retina-like images (256²) with vessel masks into $work/synth"
hiresctl synth seg-vessels "$work/synth" --count 40 --size 256 --seed 0
echo "== tile images and masks into $work/dataset.zarr"
hiresctl tile "$work/synth/images" --labels "$work/synth/labels.csv" --masks "$work/synth/masks" \
  --mask-classes "$work/synth/classes.csv" --chunk 64 --out "$work/dataset.zarr"
for method in patchgd-global downsample; do
  echo "== train $method into $work/run-$method"
  rm -rf "$work/run-$method"
  hiresctl train --task seg --method "$method" --data "$work/dataset.zarr" \
    --recipe "$here/recipes/seg-demo-patchgd-global.yaml" --out "$work/run-$method"
done
echo "== evaluate both on the test split and write the report into $work/report"
hiresctl eval "$work/run-patchgd-global" "$work/run-downsample" --data "$work/dataset.zarr" --split test \
  --report --out "$work/report"
echo "== predict test masks into $work/predictions (NGFF label images, QuPath GeoJSON, overlays)"
rm -rf "$work/predictions"
hiresctl predict "$work/run-patchgd-global" "$work/dataset.zarr" --split test --out "$work/predictions"
