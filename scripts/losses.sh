#!/bin/bash
# The losses a short run of every task x method pair prints (2 epochs each, seed 0, tiny data):
# run it in two checkouts and diff the files to show a refactor changed no number.
#   scripts/losses.sh REPO OUT.txt
set -e
REPO=$1; OUT=$(realpath -m "$2")
cd "$REPO" && source scripts/env.sh >/dev/null
D="${HIRESCTL_LOSSES_DATA:-/tmp/hiresctl-losses}"
if [ ! -d $D/seg.zarr ]; then
  mkdir -p $D
  python -m hiresctl synth megapixel-mnist $D/cls --count 12 --size 256 >/dev/null
  python -m hiresctl tile $D/cls/images --labels $D/cls/labels.csv --out $D/cls.zarr --chunk 64 >/dev/null 2>&1
  python -m hiresctl synth det-mosaic $D/det --count 8 --size 256 >/dev/null
  python -m hiresctl tile $D/det/images --labels $D/det/labels.csv --coco $D/det/annotations.json --out $D/det.zarr --chunk 64 >/dev/null 2>&1
  python -m hiresctl synth seg-vessels $D/seg --count 8 --size 128 >/dev/null
  python -m hiresctl tile $D/seg/images --labels $D/seg/labels.csv --masks $D/seg/masks --mask-classes $D/seg/classes.csv --out $D/seg.zarr --chunk 32 >/dev/null 2>&1
fi
: > "$OUT"
run() { task=$1; method=$2; store=$3; shift 3
  rm -rf "$D/run"
  python -m hiresctl train --task $task --method $method --data $store --out "$D/run" --device cpu \
     --set epochs=2 --set seed=0 --set batch_size=2 "$@" >/dev/null 2>"$D/err" || { echo "$task $method FAILED: $(tail -1 "$D/err")" >> "$OUT"; return; }
  python - "$task $method" "$D/run/metrics.jsonl" >> "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2])]
print(sys.argv[1], " ".join(f"{r.get('train_loss', float('nan')):.6f}" for r in rows), " ".join(f"{v:.6f}" for r in rows for k, v in sorted(r.items()) if k.startswith('val_') and isinstance(v, float)))
PY
}
for m in patchgd-global patchgd ips downsample full e2e-mil; do run cls $m $D/cls.zarr --set backbone=tiny --set patch_size=64 --set memory_size=4 --set iter_size=4; done
for m in patchgd-global patchgd sliced downsample; do run det $m $D/det.zarr --set patch_size=128; done
for m in patchgd-global patchgd downsample full; do run seg $m $D/seg.zarr --set patch_size=32 --set backbone=unet-16; done
cat "$OUT"
