#!/usr/bin/env bash
# The main job on a small built-in example: synthesize → tile → train → eval.
# Usage: examples/quickstart.sh [WORKDIR]   (default: ./hiresctl-demo)
# A few minutes on 2 CPU cores. The recipe is examples/../recipes/cls-demo-patchgd-global.yaml.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-hiresctl-demo}"
mkdir -p "$work"
echo "== synthesize 48 UltraMNIST images (1024², 10 classes) into $work/synth"
hiresctl synth ultramnist "$work/synth" --count 48 --size 1024 --classes 10 --seed 0
echo "== tile them into the dataset store $work/dataset.zarr"
hiresctl tile "$work/synth/images" --labels "$work/synth/labels.csv" --out "$work/dataset.zarr"
hiresctl info "$work/dataset.zarr"
echo "== train PatchGD + global patch (tiny CNN, patch 128) into $work/run"
rm -rf "$work/run"
hiresctl train --task cls --data "$work/dataset.zarr" --recipe "$here/recipes/cls-demo-patchgd-global.yaml" --out "$work/run"
echo "== evaluate on the test split"
hiresctl eval "$work/run" --data "$work/dataset.zarr" --split test
