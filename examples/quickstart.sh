#!/usr/bin/env bash
# The main job on a small built-in example: synthesize → tile → info.
# Usage: examples/quickstart.sh [WORKDIR]   (default: ./hiresctl-demo)
set -euo pipefail
work="${1:-hiresctl-demo}"
mkdir -p "$work"
echo "== synthesize 24 UltraMNIST images (1024², 10 classes) into $work/synth"
hiresctl synth ultramnist "$work/synth" --count 24 --size 1024 --classes 10 --seed 0
echo "== tile them into the dataset store $work/dataset.zarr"
hiresctl tile "$work/synth/images" --labels "$work/synth/labels.csv" --out "$work/dataset.zarr"
echo "== describe the store"
hiresctl info "$work/dataset.zarr"
