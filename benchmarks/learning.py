"""Do hiresctl's classification methods learn what a plain PyTorch CNN learns? (side by side)

    python benchmarks/learning.py --task megapixel-mnist [--side 256] [--count 1000] [--epochs 8]
    python benchmarks/learning.py --task ultramnist --side 512 --classes 10
    python benchmarks/learning.py --task fine-detail --side 512 --count 200 --epochs 10
    python benchmarks/learning.py --task sparse-slide --memory-budget 3GiB --report DIR

With ``--report DIR`` the hiresctl runs (first seed) also go through ``hiresctl eval --report``:
one page with every method side by side on the test split (accuracy, AUC, memory, training
time and, for the feature methods, the extraction time counted in).

Every row trains on the same store (and, for the reference, the same TIFFs and splits) with the
same encoder architecture, epochs and seed; the test split is scored with `hiresctl eval` on the
best-validation checkpoint. The first row is a **plain reference that owes nothing to
hiresctl** (`benchmarks/reference.py`: the TIFFs read with tifffile, a bare loop); `full` is
hiresctl's whole-image baseline with the same network, so the two must agree, and the patch
methods are measured against both. Tasks:

- `megapixel-mnist`: the IPS paper's majority task (5 digits, 3 of the target class, scribbles).
- `ultramnist`: the PatchGD paper's sums of 3–5 digits of very different sizes.
- `fine-detail`: a checkerboard that downsampling averages away (built for the patch methods).
- `sparse-slide`: a slide in miniature, 1–3 small lesions (large nuclei) among decoy aggregates
  of small nuclei in a large tissue area: the sparse-signal setting where whole-slide users
  compare frozen features + MIL with end-to-end methods. Patches keep to the tissue
  (`--foreground-threshold`).

Results replace the task's section of BENCHMARKS.md (`learning-<task>`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import hiresctl, publish, synth_store  # noqa: E402
from reference import train_reference  # noqa: E402

METHODS = (
    "full",
    "patchgd-global",
    "patchgd",
    "ips",
    "e2e-mil",
    "abmil",
    "ips-features",
    "downsample",
)
# train on `hiresctl embed` features (the extraction's time counted in)
FEATURE_METHODS = ("abmil", "transmil", "ips-features")
TASKS = {  # synth kind, extra synth arguments, default side, what the label is
    "megapixel-mnist": (
        "megapixel-mnist",
        ["--task", "majority"],
        256,
        "the digit present three times among five (10 classes) over line scribbles",
    ),
    "ultramnist": ("ultramnist", [], 512, "the sum of 3–5 digits scaled ×1–9"),
    "fine-detail": (
        "fine-detail",
        [],
        512,
        "a 32² one-pixel checkerboard or a flat square of the same mean (2 classes)",
    ),
    "sparse-slide": (
        "sparse-slide",
        [],
        1024,
        "whether 1–3 lesions of large nuclei sit among the decoy aggregates of small "
        "ones (2 classes)",
    ),
}
# the share of a patch's pixels that must be foreground for it to be kept (embedding too)
FOREGROUND = {"sparse-slide": 0.1}
# The encoders, as the reference builds them (bare PyTorch) and as hiresctl names them: the
# widths of a plain CNN, or None for a torchvision network the reference builds by that name.
ENCODERS: dict[str, tuple[int, ...] | None] = {
    "tiny": (16, 32, 48, 64),
    "cnn5": (32, 64, 64, 128, 128),
    "tiny-s2d": (16, 32, 48, 64),
    "cnn5-s2d": (32, 64, 64, 128, 128),
    "mobilenet_v2": None,
    "resnet18": None,
}


def encoder_words(backbone: str) -> str:
    """How the table's header describes an encoder."""
    widths = ENCODERS[backbone]
    if widths is None:
        return f"torchvision's `{backbone}` from random weights, global average pooling"
    stem = "a 2×2 space-to-depth stem, then " if backbone.endswith("-s2d") else ""
    return f"{stem}{'-'.join(map(str, widths))} wide 3×3 convs, max-pooling, global max"


def make_dataset(
    root: Path,
    task: str,
    side: int,
    count: int,
    classes: int,
    seed: int = 3,
    mnist: Path | None = None,
) -> Path:
    kind, extra, _, _ = TASKS[task]
    if kind == "ultramnist":
        extra = [*extra, "--classes", str(classes)]
    if mnist is not None:
        extra = [*extra, "--mnist", str(mnist)]
    return synth_store(root, kind, count, side, seed, extra, [])


def train_and_evaluate(store: Path, out: Path, options: list[str]) -> dict:
    """``hiresctl train`` into a fresh ``out``, then ``hiresctl eval`` on the test split: the
    classification numbers the learning tables show."""
    report, summary, seconds = train_eval(store, out, options)
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "test_accuracy": report["metrics"]["accuracy"],
        "test_auc": report["metrics"].get("auc"),
        "feature_seconds": summary.get("prepared_seconds") or 0.0,
        "val_curve": [row.get("val_accuracy") for row in curve],
        "train_peak_gb": summary["peak_memory_gb"],
        "images_per_second": summary["images_per_second"],
        "seconds": seconds,
    }


def train_run(store: Path, out: Path, options: list[str]) -> tuple[dict, float]:
    """``hiresctl train`` into a fresh ``out``: the training summary and the process's seconds."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    command = ["train", "--data", str(store), "--out", str(out), "--json", *options]
    train = subprocess.run(
        [sys.executable, "-m", "hiresctl", *command],
        capture_output=True,
        text=True,
    )
    if train.returncode:
        raise RuntimeError(train.stderr[-2000:])
    return json.loads(train.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def train_eval(store: Path, out: Path, options: list[str]) -> tuple[dict, dict, float]:
    """:func:`train_run`, then ``hiresctl eval`` on the test split: the evaluation report, the
    training summary and the training process's seconds (every task)."""
    summary, seconds = train_run(store, out, options)
    evaluated = hiresctl("eval", str(out), "--data", str(store), "--split", "test", "--json")
    return json.loads(evaluated.stdout), summary, seconds


def feature_set(args: argparse.Namespace) -> str:
    """The feature set's name: the embedding encoder's and the patch size."""
    return f"bench-{args.embed_backbone or args.backbone}-{args.patch_size}"


def embed_features(store: Path, args: argparse.Namespace) -> tuple[str, float]:
    """The feature set of the benchmark's encoder and patch size, and the seconds it took
    (``hiresctl embed`` skips images already done, so a second method pays nothing)."""
    name = feature_set(args)
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "hiresctl",
        "embed",
        str(store),
        "--backbone",
        args.embed_backbone or args.backbone,
        "--patch-size",
        str(args.patch_size),
        "--name",
        name,
        "--device",
        "cpu",
    ]
    if args.embed_weights:
        command += ["--pretrained", str(args.embed_weights)]
    if args.foreground_threshold:
        command += ["--foreground-threshold", str(args.foreground_threshold)]
    subprocess.run(command, check=True, capture_output=True)
    return name, time.perf_counter() - start


def row_specs(text: str) -> list[str]:
    """``--methods`` as rows: ';' between rows, or ',' where what follows is a method (a
    ``key=value`` after a ',' belongs to the row before: ``patchgd:patch_size=128,fill_mode=train``)."""
    if ";" in text:
        return [m for m in text.split(";") if m]
    rows: list[str] = []
    for part in filter(None, text.split(",")):
        if rows and "=" in part and ":" not in part:
            rows[-1] += "," + part
        else:
            rows.append(part)
    return rows


def split_variant(spec: str) -> tuple[str, list[str]]:
    """``patchgd-global:global_grad=1,fusion=add`` → the method and its extra ``--set``s (a row
    that changes one setting of a method's defaults, for ablations)."""
    method, _, changes = spec.partition(":")
    extra = []
    for change in filter(None, changes.split(",")):
        extra += ["--set", change]
    return method, extra


def sets(**values: object) -> list[str]:
    """``--set key=value`` options of ``hiresctl train``."""
    return [part for key, value in values.items() for part in ("--set", f"{key}={value}")]


def method_options(method: str, args: argparse.Namespace) -> list[str]:
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    ips = sets(latent_dim=64, memory_size=args.ips_memory, iter_size=args.ips_memory, heads=4)
    common = ["--method", method, "--device", "cpu", *budget]
    common += sets(epochs=args.epochs, batch_size=args.batch_size)
    if method in FEATURE_METHODS:
        options = common + sets(lr="1e-3", features=feature_set(args))
        return options + (ips if method == "ips-features" else [])
    options = common + sets(backbone=args.backbone, patch_size=args.patch_size, head_width=64)
    if args.foreground_threshold:
        options += sets(foreground_threshold=args.foreground_threshold)
    if method == "e2e-mil":
        options += sets(bag_size=args.bag_size)
    if method == "ips":
        options += ips
    return options


SUMMARISED = (
    "test_accuracy",
    "test_auc",
    "feature_seconds",
    "val_curve",
    "train_peak_gb",
    "images_per_second",
    "seconds",
)


def summarise(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    accuracies = [r["test_accuracy"] for r in runs]
    aucs = [r["test_auc"] for r in runs if r.get("test_auc") is not None]
    curves = [r["val_curve"] for r in runs]
    return {
        "accuracy": statistics.mean(accuracies),
        "spread": (min(accuracies), max(accuracies)),
        "curve": [statistics.mean(c[i] or 0 for c in curves) for i in range(len(curves[0]))],
        "train_peak_gb": median("train_peak_gb"),
        "images_per_second": median("images_per_second"),
        "seconds": median("seconds"),
        "feature_seconds": median("feature_seconds"),
        "auc": statistics.mean(aucs) if aucs else None,
        "seeds": len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="megapixel-mnist")
    parser.add_argument("--side", type=int, default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10, help="ultramnist: 10 or 28")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backbone", choices=list(ENCODERS), default="tiny")
    parser.add_argument("--ips-memory", type=int, default=8, help="IPS M (and I)")
    parser.add_argument("--bag-size", type=int, default=8, help="e2e-mil K")
    parser.add_argument(
        "--embed-weights",
        type=Path,
        default=None,
        help="abmil/transmil: encoder weights for `hiresctl embed` (default: random)",
    )
    parser.add_argument(
        "--embed-backbone",
        default=None,
        help="abmil/transmil/ips-features: the encoder `hiresctl embed` runs (a short, timm or "
        "Hub name, e.g. dinov2-s or resnet50-trunc, with --embed-weights); default: --backbone",
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--section",
        default=None,
        help="the BENCHMARKS.md section to write (default: learning-<task>[-mnist][-<backbone>]; "
        "name another to keep a table of another canvas size beside it)",
    )
    parser.add_argument(
        "--mnist",
        type=Path,
        default=None,
        help="folder of MNIST's IDX files: the task's digits are real MNIST",
    )
    parser.add_argument(
        "--methods",
        default=",".join(("reference", *METHODS)),
        help="rows to train (',' or ';' between them); '' republishes the kept rows",
    )
    parser.add_argument(
        "--memory-budget", default=None, help="every hiresctl run's budget, e.g. 3GiB"
    )
    parser.add_argument(
        "--foreground-threshold",
        type=float,
        default=None,
        help="patches kept (and embedded) by their foreground share; default per task",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="also write `hiresctl eval --report` over the first seed's runs here",
    )
    args = parser.parse_args()
    if args.foreground_threshold is None:
        args.foreground_threshold = FOREGROUND.get(args.task, 0.0)
    side = args.side or TASKS[args.task][2]
    digits = "_mnist" if args.mnist else ""
    root = HERE / "data" / f"learning_{args.task}{digits}_{side}_{args.count}"
    store = make_dataset(root, args.task, side, args.count, args.classes, mnist=args.mnist)
    # each row's runs are kept as they finish, per encoder, epochs and seeds: a later call with
    # other --methods adds rows to the same table, and --methods '' republishes what is kept
    kept_file = root / f"results_{args.backbone}_{args.epochs}ep_{args.seeds}seeds.json"
    kept: dict[str, list[dict]] = json.loads(kept_file.read_text()) if kept_file.exists() else {}
    specs = row_specs(args.methods)
    for spec in specs:
        method, extra = split_variant(spec)
        runs = list(kept.get(spec, []))[: args.seeds]  # seeds already measured are kept
        for seed in range(len(runs), args.seeds):
            if method == "reference":
                result = train_reference(
                    root / "synth",
                    args.epochs,
                    args.batch_size,
                    seed=seed,
                    widths=ENCODERS[args.backbone] or (),
                    log=lambda line: None,
                    space_to_depth=args.backbone.endswith("-s2d"),
                    net="plain" if ENCODERS[args.backbone] else args.backbone,
                )
                result["val_curve"] = [row["val_accuracy"] for row in result["curve"]]
                result["train_peak_gb"] = result["peak_memory_gb"]
                result["feature_seconds"] = 0.0
            else:
                if method in FEATURE_METHODS:
                    embed_features(store, args)  # once: a second method's call skips every image
                options = [*method_options(method, args), *extra, "--set", f"seed={seed}"]
                result = train_and_evaluate(store, run_folder(root, spec, args, seed), options)
            runs.append({key: result[key] for key in SUMMARISED if key in result})
            print(spec, seed, f"test {result['test_accuracy']:.3f}", flush=True)
            kept[spec] = runs  # written after every seed: an interrupted call resumes there
            kept_file.write_text(json.dumps(kept, indent=1))
    rows = kept_rows(root, args)
    if not rows:
        sys.exit(f"no rows measured or kept in {kept_file}")
    if args.report:
        write_report(root, store, rows, args)
    publish(table(rows, side, args), section_name(args))


def kept_rows(root: Path, args: argparse.Namespace) -> list[tuple[str, dict]]:
    """Every row kept for this encoder and epochs, whatever number of seeds it was run with
    (each row from the file that holds the most of its seeds), in the order first measured."""
    best: dict[str, list[dict]] = {}
    files = sorted(root.glob(f"results_{args.backbone}_{args.epochs}ep_*seeds.json"))
    for path in sorted(files, key=lambda f: int(f.stem.rsplit("_", 1)[1].removesuffix("seeds"))):
        for spec, runs in json.loads(path.read_text()).items():
            if runs and len(runs) >= len(best.get(spec, [])):
                best[spec] = runs
    order = ["reference", "full"]
    ranked = sorted(best, key=lambda spec: order.index(spec) if spec in order else len(order))
    return [(spec, summarise(best[spec])) for spec in ranked]


def section_name(args: argparse.Namespace) -> str:
    if args.section:
        return str(args.section)
    # one section per task and encoder: the tiny table and the cnn5 table stand side by side
    suffix = "" if args.backbone == "tiny" else f"-{args.backbone}"
    return f"learning-{args.task}{'-mnist' if args.mnist else ''}{suffix}"


def run_folder(root: Path, spec: str, args: argparse.Namespace, seed: int) -> Path:
    name = spec.replace(":", "-").replace("=", "").replace(",", "-")
    return root / f"run-{name}-{args.backbone}-{args.epochs}ep-{seed}"


def write_report(
    root: Path, store: Path, rows: list[tuple[str, dict]], args: argparse.Namespace
) -> None:
    """``hiresctl eval --report`` over the first seed's hiresctl runs."""
    runs = [str(run_folder(root, spec, args, 0)) for spec, _ in rows if spec != "reference"]
    command = ["eval", *runs, "--data", str(store), "--split", "test", "--report"]
    subprocess.run(
        [sys.executable, "-m", "hiresctl", *command, "--out", str(args.report)],
        check=True,
        capture_output=True,
    )
    print(f"report: {args.report / 'report.html'}", flush=True)


def table(rows: list[tuple[str, dict]], side: int, args: argparse.Namespace) -> list[str]:
    """The task's section: how to reproduce each row, the data, the setting, the rows."""
    kind, _, _, label = TASKS[args.task]
    command = (
        f"python benchmarks/learning.py --task {args.task} --side {side} --count {args.count} "
        f"--epochs {args.epochs} --backbone {args.backbone}"
    )
    if args.batch_size != 4 or args.patch_size != 64:
        command += f" --batch-size {args.batch_size} --patch-size {args.patch_size}"
    if args.task == "ultramnist":
        command += f" --classes {args.classes}"
    if args.memory_budget:
        command += f" --memory-budget {args.memory_budget}"
    if args.mnist:
        command += " --mnist MNIST_DIR"
    if args.section:
        command += f" --section {args.section}"
    by_seeds: dict[int, list[str]] = {}
    for spec, s in rows:
        by_seeds.setdefault(s["seeds"], []).append(spec)
    commands = "; ".join(
        f"`{command} --seeds {n} --methods '{';'.join(specs)}'`"
        for n, specs in sorted(by_seeds.items(), reverse=True)
    )
    kept = (
        f"; patches with at least {args.foreground_threshold:.0%} foreground"
        if args.foreground_threshold
        else ""
    )
    budget = (
        f"; every hiresctl run under `--memory-budget {args.memory_budget}`"
        if args.memory_budget
        else ""
    )
    with_auc = any(s["auc"] is not None for _, s in rows)
    lines = [
        f"## Learning: {args.task}{' (real MNIST)' if args.mnist else ''}, "
        f"{time.strftime('%Y-%m-%d')}, CPU (2 cores)",
        "",
        f"Commands (rows by their number of seeds): {commands}. A row `method:key=value,…` is "
        "the method with those recipe keys set. Data: `hiresctl synth "
        + kind
        + (
            " --mnist MNIST_DIR` (real MNIST digits: MNIST-train in training images, t10k in "
            "the others)"
            if args.mnist
            else "` (scikit-learn's 8×8 digits, upscaled)"
        )
        + f", {args.count} images of {side}² "
        f"(70/15/15% train/val/test), label: {label}. Every row: the `{args.backbone}` encoder "
        f"({encoder_words(args.backbone)}), "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr 1e-3; patch {args.patch_size} for "
        f"the patch methods unless the row sets another (IPS keeps M = {args.ips_memory}); "
        f"`downsample` sees the image at {args.patch_size}²{kept}{budget}. Test accuracy "
        "(and AUC) of the best-validation epoch, mean over the seeds [min–max]; the curve is "
        "the mean validation accuracy per epoch; speed columns are medians over the seeds. The "
        "reference row is bare PyTorch on the TIFFs (`benchmarks/reference.py`), nothing of "
        f"hiresctl. `e2e-mil` trains on K = {args.bag_size} random patches per image per step; "
        "`abmil`, `transmil` and `ips-features` train on features `hiresctl embed` stored once "
        + ("with the same encoder, " if not args.embed_backbone else "with ")
        + (
            f"`{args.embed_backbone or args.backbone}` with weights {args.embed_weights.name}"
            if args.embed_weights
            else "**random weights** (nothing pretrained can be downloaded here)"
        )
        + "; their extraction (every image of the store, reads and encoding) is the features "
        "column and counts in their total.",
        "",
        "| method | test accuracy, mean [min–max] | seeds | "
        + ("test AUC | " if with_auc else "")
        + "validation accuracy by epoch | train peak RSS GB | train images/s | train s | "
        "features s | total s |",
        "|---|---|---|" + ("---|" if with_auc else "") + "---|---|---|---|---|---|",
    ]
    for method, s in rows:
        name = "plain PyTorch reference" if method == "reference" else method
        curve = " ".join(f"{v:.2f}" for v in s["curve"])
        auc = (f"{s['auc']:.3f} | " if s["auc"] is not None else "– | ") if with_auc else ""
        features = f"{s['feature_seconds']:.0f}" if s["feature_seconds"] else "–"
        lines.append(
            f"| {name} | {s['accuracy']:.3f} [{s['spread'][0]:.2f}–{s['spread'][1]:.2f}] | "
            f"{s['seeds']} | {auc}{curve} | {s['train_peak_gb']:.2f} | "
            f"{s['images_per_second']:.1f} | {s['seconds']:.0f} | {features} | "
            f"{s['seconds'] + s['feature_seconds']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
