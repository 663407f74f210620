#!/usr/bin/env bash
# Frozen features + attention MIL beside end-to-end MIL on random patch bags, on the demo's data:
# embed every patch once → train abmil on the stored features → train e2e-mil on K random patches
# per image → one report with both (the extraction's time counted into abmil's).
# Usage: examples/mil.sh [WORKDIR]   (default: ./hiresctl-demo, the folder `./run demo` fills;
# its dataset.zarr is reused, else a smaller fine-detail store is made). A few minutes on 2 cores.
set -euo pipefail
work="${1:-hiresctl-demo}"
mkdir -p "$work"
if [ ! -f "$work/dataset.zarr/zarr.json" ]; then
  echo "== synthesize 120 fine-detail images (512²) and tile them into $work/dataset.zarr"
  hiresctl synth fine-detail "$work/synth" --count 120 --size 512 --seed 0
  hiresctl tile "$work/synth/images" --labels "$work/synth/labels.csv" --out "$work/dataset.zarr"
fi
echo "== embed every 64² patch once with the tiny CNN (random weights; --pretrained W.pt for yours)"
hiresctl embed "$work/dataset.zarr" --backbone tiny --patch-size 64
rm -rf "$work/run-abmil" "$work/run-e2e-mil"
echo "== train gated-attention MIL on the stored features into $work/run-abmil"
hiresctl train --task cls --data "$work/dataset.zarr" --out "$work/run-abmil" --method abmil \
  --set epochs=20 --set lr=1e-3
echo "== train the encoder and attention together on 16 random patches per image into $work/run-e2e-mil"
hiresctl train --task cls --data "$work/dataset.zarr" --out "$work/run-e2e-mil" --method e2e-mil \
  --set backbone=tiny --set patch_size=64 --set bag_size=16 --set epochs=4 --set lr=1e-3
echo "== evaluate both on the test split and write the report into $work/report-mil"
hiresctl eval "$work/run-abmil" "$work/run-e2e-mil" --data "$work/dataset.zarr" --split test \
  --report --out "$work/report-mil"
echo "open $work/report-mil/report.html"
