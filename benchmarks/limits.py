"""How close training runs to the machine's own limits (C1), measured in one run.

    python benchmarks/limits.py [--threads 2] [--batch 16] [--repeats 5] [--processes 3] [--device cuda]

First the machine's ceilings, each the median of at least ``--repeats`` timings (and at
least one second of them, after three warm-up calls): fp32 matrix multiply
(2048²), 3×3 convolutions (the best of 64, 128 and 256 channels on 16 images of 128², 64²
and 32², channels-last, forward and backward) and memory bandwidth (a 256 MiB copy). Then every registered encoder,
training (forward and backward of a batch of ``--batch`` patches) and without gradient (a
forward, as latent fills, selection and evaluation run), at the patch sizes the recipes use,
in the memory layout hiresctl runs it in (channels-last, see ``hiresctl.models``) and in the
default layout: FLOP/s counted by ``torch.utils.flop_counter`` and as a share of the
convolution ceiling. Last, one training step of each classification method (Megapixel MNIST
512² from the synthesizer, the classification defaults) with its FLOP/s. Names the CPU (or,
with ``--device cuda``, the GPU: the same rows with the matrix multiply at 8192², the section
"Machine limits (C1, GPU)"). The table replaces the "Machine limits (C1)" section of
BENCHMARKS.md.

Everything is measured in ``--processes`` fresh processes (default 3 on a CPU, 1 on a GPU), one
after another, each timing its own ceilings before its rows; every cell is the median over the
processes, and the range of the shares follows it. Each share is taken against the convolution
ceiling timed right beside the row (:func:`beside`: three alternations of the ceiling's best
convolution and the row's step): on shared virtual cores the speed drifts over seconds to
minutes (the host's other work), and a ceiling timed minutes before a row would read that drift
as a share (a process whose ceilings ran in a slow stretch gave shares above 100%). The small
encoders' steps run up to a third slower in such stretches while a big convolution barely
notices, so one process's reading is still one draw of that, not the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import hiresctl as _hiresctl  # noqa: E402
from _common import publish  # noqa: E402

# (encoder, patch sides the recipes use it at)
ENCODERS = {
    "tiny": (64, 256),
    "tiny-s2d": (64, 256),
    "cnn5": (64, 256),
    "cnn5-s2d": (64, 256),
    "resnet18": (256,),
    "resnet50": (256,),
    "mobilenet_v2": (256,),
    "unet-16": (128,),
    "unet": (128,),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


DEVICE = torch.device("cpu")  # set by --device


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else cpu_name()


def timed(run: Callable[[], object], repeats: int, seconds: float = 1.0, warm_up: int = 3) -> float:
    """Median seconds of ``run`` after ``warm_up`` calls (the kernels' first-call setup, the
    allocator's first pages), over at least ``repeats`` calls and at least ``seconds``, so a
    10 ms step is timed as often as a 200 ms one is long (a GPU's queue drained each time)."""
    for _ in range(warm_up):
        run()
    sync()
    times: list[float] = []
    while len(times) < repeats or sum(times) < seconds:
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast(precision: str) -> contextlib.AbstractContextManager[object]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=dtype)


# (channels, side) of the 3×3 convolutions (16 images, forward + backward) of the conv ceiling
CONV_SHAPES = ((64, 128), (128, 64), (256, 32))


def matmul_side() -> int:
    return 8192 if DEVICE.type == "cuda" else 2048


# precision -> (the step of its best convolution, its FLOP): the ceiling timed beside each row
CEILING_STEPS: dict[str, tuple[Callable[[], None], int]] = {}
ROUNDS = 3  # alternations of the ceiling's convolution and a row's step


def ceilings(repeats: int) -> dict[str, float]:
    out = {}
    n = matmul_side()
    for precision, dtype in PRECISIONS.items():
        a = torch.randn(n, n, dtype=dtype or torch.float32, device=DEVICE)
        b = torch.randn(n, n, dtype=dtype or torch.float32, device=DEVICE)
        out[f"matmul_{precision}"] = 2 * n**3 / timed(lambda a=a, b=b: a @ b, repeats)
        # the best of three 3×3 convolutions of the widths and sides encoders use: 64 channels
        # are too narrow to fill the vector units, so one shape alone is no ceiling
        best = 0.0
        for channels, side in CONV_SHAPES:
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            conv = conv.to(DEVICE, memory_format=torch.channels_last)
            x = torch.randn(16, channels, side, side, device=DEVICE)
            x = x.to(memory_format=torch.channels_last).requires_grad_()

            def conv_step(conv=conv, x=x, precision=precision) -> None:
                with autocast(precision):
                    y = conv(x)
                y.float().sum().backward()

            count = flops(conv_step)
            rate = count / timed(conv_step, repeats)
            out[f"conv_{precision}_{channels}"] = rate
            if rate > best:
                best = rate
                CEILING_STEPS[precision] = (conv_step, count)
        out[f"conv_{precision}"] = best
    big = torch.empty(64 * 2**20, dtype=torch.float32, device=DEVICE)
    other = torch.empty_like(big)
    out["bandwidth"] = 2 * big.numel() * 4 / timed(lambda: other.copy_(big), repeats)
    return out


def beside(
    step: Callable[[], object], count: int, precision: str, repeats: int
) -> tuple[float, float]:
    """FLOP/s of ``step`` (``count`` FLOP) and its share of the convolution ceiling of
    ``precision`` timed right beside it: ``ROUNDS`` alternations of the ceiling's convolution
    (at least 2 calls and 0.2 s) and the step (at least ``repeats / ROUNDS`` calls and 0.4 s),
    a share per alternation, the median of those. On shared cores whose speed drifts over
    seconds to minutes, a share against a ceiling timed minutes earlier reads the drift."""
    conv_step, conv_count = CEILING_STEPS[precision]
    calls = max(2, -(-repeats // ROUNDS))
    times, shares = [], []
    for index in range(ROUNDS):
        ceiling_rate = conv_count / timed(conv_step, 2, 0.2, warm_up=1)
        seconds = timed(step, calls, 0.4, warm_up=3 if index == 0 else 1)
        times.append(seconds)
        shares.append(count / seconds / ceiling_rate)
    return count / statistics.median(times), statistics.median(shares)


def encoder(name: str) -> torch.nn.Module:
    from hiresctl.models import BACKBONES, create_backbone, create_seg_network

    return create_backbone(name) if name in BACKBONES else create_seg_network(name, 8)


# (precision, layout) of each measured column pair: what hiresctl runs, then the default layout
SETUPS = (
    ("bf16", torch.channels_last),
    ("fp32", torch.channels_last),
    ("fp32", torch.contiguous_format),
)
LAYOUTS = {torch.channels_last: "channels_last", torch.contiguous_format: "contiguous"}


def encoder_rates(batch: int, repeats: int) -> dict[str, float]:
    """FLOP/s of every encoder, side, setup and pass, keyed ``name|side|precision|layout|pass``."""
    rates = {}
    for name, sides in ENCODERS.items():
        for side in sides:
            for precision, layout in SETUPS:
                model = encoder(name).to(DEVICE, memory_format=layout)
                x = torch.randn(batch, 3, side, side, device=DEVICE).to(memory_format=layout)

                def train_step(model=model, x=x, precision=precision) -> None:
                    model.train()
                    with autocast(precision):
                        y = model(x)
                    y.float().sum().backward()

                def no_grad(model=model, x=x, precision=precision) -> None:
                    model.eval()
                    with torch.inference_mode(), autocast(precision):
                        model(x)

                for kind, step in (("train", train_step), ("no_grad", no_grad)):
                    key = f"{name}|{side}|{precision}|{LAYOUTS[layout]}|{kind}"
                    rates[key], rates[f"{key}|share"] = beside(
                        step, flops(step), precision, repeats
                    )
    return rates


METHODS = ("patchgd-global", "patchgd", "ips", "downsample", "full")


def method_rates(repeats: int) -> dict[str, float]:
    """Seconds and FLOP/s of one training step of each classification method on Megapixel
    MNIST 512², keyed ``method|precision|seconds`` and ``method|precision|rate``."""
    import shutil

    source = DATA / "c1_mm512_src"
    store = DATA / "c1_mm512.zarr"
    if not (store / "zarr.json").exists():
        _hiresctl("synth", "megapixel-mnist", str(source), "--count", "8", "--size", "512")
        _hiresctl(
            "tile",
            str(source / "images"),
            "--labels",
            str(source / "labels.csv"),
            "--out",
            str(store),
        )
        shutil.rmtree(source)
    out = {}
    for method in METHODS:
        for precision in PRECISIONS:
            seconds, rate, share = method_step(store, method, precision, repeats)
            out[f"{method}|{precision}|seconds"] = seconds
            out[f"{method}|{precision}|rate"] = rate
            out[f"{method}|{precision}|rate|share"] = share
    return out


def method_step(
    store: Path, method: str, precision: str, repeats: int
) -> tuple[float, float, float]:
    """Median seconds, FLOP/s and share of the ceiling (:func:`beside`) of one training step
    of ``method``."""
    import shutil

    from hiresctl.train import Trainer, load_recipe

    settings = {
        "batch_size": 4,
        "epochs": 1,
        "train_split": "train",
        "val_split": "none",
        "precision": precision,
        "backbone": "tiny-s2d",
    }
    if method != "full":
        settings.update({"patch_size": 64, "memory_size": 8})
    recipe = load_recipe(None, "cls", method, settings)
    out = DATA / "c1_runs" / method
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(store, out, recipe, device=DEVICE.type, log=lambda message: None)
    run = trainer.run
    images = [im.image_id for im in trainer.train_images[:4]]
    targets = torch.tensor([im.target for im in trainer.train_images[:4]])
    ctx = run.context(torch.optim.AdamW(run.model.parameters(), lr=1e-3))
    reads = list(run.reads(images, train=True))

    def step() -> None:  # pixels already in memory: the step's compute alone
        run.method.train_batch(ctx, images, targets, iter(reads))

    count = flops(step)
    rate, share = beside(step, count, precision, repeats)
    return count / rate, rate, share


def measure(args: argparse.Namespace) -> dict[str, object]:
    """One process's measurements: its ceilings, then every row, as numbers."""
    from hiresctl.train.memory import keep_large_allocations

    if args.allocator == "glibc":  # what a MALLOC_* variable would say: the trainer leaves it
        os.environ.setdefault("MALLOC_MMAP_MAX_", "65536")
    kept = args.allocator == "hiresctl" and keep_large_allocations(DEVICE)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, object] = {"kept": kept, "ceilings": ceilings(args.repeats)}
    out["encoders"] = encoder_rates(args.batch, args.repeats)
    if not args.skip_methods:
        out["methods"] = method_rates(args.repeats)
    return out


def measure_in_processes(args: argparse.Namespace) -> list[dict]:
    """:func:`measure` in ``args.processes`` fresh processes, one after another (never two at
    once: they would share the cores). Each is a draw of the cores' state during its minutes."""
    import json
    import subprocess
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.processes):
            path = Path(tmp) / f"{index}.json"
            command = [sys.executable, __file__, "--worker", str(path)]
            command += ["--threads", str(args.threads), "--batch", str(args.batch)]
            command += ["--repeats", str(args.repeats), "--device", args.device]
            command += ["--allocator", args.allocator]
            command += ["--skip-methods"] if args.skip_methods else []
            print(f"process {index + 1} of {args.processes}", file=sys.stderr, flush=True)
            subprocess.run(command, check=True)
            results.append(json.loads(path.read_text()))
    return results


def spread(values: list[float]) -> str:
    """``median`` as a share, and the range over processes where there are several."""
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.0%}"
    return f"{middle:.0%}; {min(values):.0%}–{max(values):.0%}"


def rate_cell(results: list[dict], group: str, key: str) -> str:
    """Median GFLOP/s over processes and, in brackets, the median of each process's share of
    the ceiling timed beside the row (:func:`beside`), with its range."""
    rates = [r[group][key] for r in results]
    shares = [r[group][f"{key}|share"] for r in results]
    return f"{statistics.median(rates) / 1e9:.0f} ({spread(shares)})"


def ceiling(results: list[dict], key: str, digits: int = 0) -> str:
    """Median GFLOP/s (or GB/s) of a ceiling over processes, with its range."""
    values = [r["ceilings"][key] / 1e9 for r in results]
    middle = f"{statistics.median(values):.{digits}f}"
    if len(values) == 1:
        return middle
    return f"{middle} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="measure everything in this many fresh processes, one after another, and report "
        "the median with its range (default 3 on a CPU, 1 on a GPU)",
    )
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--allocator",
        choices=("hiresctl", "glibc"),
        default="hiresctl",
        help="CPU: glibc's heap kept for large allocations as hiresctl trains without a memory "
        "budget (hiresctl.train.memory.keep_large_allocations), or glibc's defaults",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # measure, write JSON
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    gpu = DEVICE.type == "cuda"
    if args.worker is not None:
        import json

        args.worker.write_text(json.dumps(measure(args)))
        return
    if args.processes is None:
        args.processes = 1 if gpu else 3
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    results = measure_in_processes(args)
    kept = all(r["kept"] for r in results)
    many = args.processes > 1
    date = time.strftime("%Y-%m-%d")
    command = f"python benchmarks/limits.py --threads {args.threads} --batch {args.batch}"
    command += " --device cuda" if gpu else ""
    command += f" --processes {args.processes}" if args.processes != (1 if gpu else 3) else ""
    command += " --allocator glibc" if args.allocator == "glibc" else ""
    lines = [
        f"## Machine limits (C1{', GPU' if gpu else ''}"
        + (", glibc's default allocation" if args.allocator == "glibc" else "")
        + f"), {date}, {device_name()}"
        + ("" if gpu else f", {args.threads} threads"),
        "",
        f"Command: `{command}`. "
        + (
            f"Everything below was measured in {args.processes} fresh processes, one after "
            "another, each measuring its own ceilings and then every row; a cell gives the "
            "median over the processes and, after the semicolon, the range of the shares (on "
            "shared virtual cores a small encoder's step runs up to a third slower for "
            "stretches of seconds to minutes). "
            if many
            else ""
        )
        + f"Ceilings (medians of the timings{', range over the processes' if many else ''}): "
        f"matmul {matmul_side()}² **{ceiling(results, 'matmul_fp32')} GFLOP/s** float32, "
        f"**{ceiling(results, 'matmul_bf16')}** bfloat16; 3×3 convolutions C→C on 16 images "
        "(channels-last, forward + backward), the best of "
        + ", ".join(
            f"{c}→{c} at {side}² ({ceiling(results, f'conv_fp32_{c}')} / "
            f"{ceiling(results, f'conv_bf16_{c}')})"
            for c, side in CONV_SHAPES
        )
        + f": **{ceiling(results, 'conv_fp32')} GFLOP/s** "
        f"float32, **{ceiling(results, 'conv_bf16')}** in bfloat16 autocast; memory bandwidth "
        f"(256 MiB copy) **{ceiling(results, 'bandwidth', 1)} GB/s**. Each encoder on a batch of "
        f"{args.batch} patches: GFLOP/s counted by torch's flop counter and, in brackets, as a "
        "share of the convolution ceiling of the same precision timed right beside the row "
        f"({ROUNDS} alternations of the ceiling's best convolution and the row's step, the "
        "median of their shares), so a drift of the cores' speed between the ceilings above "
        "and the row does not read as a share; "
        "training = forward and backward, no-grad = a forward in inference mode. hiresctl runs "
        "encoders channels-last, in bfloat16 autocast where the device computes it natively "
        "(`precision: auto`)"
        + (
            "; every row with glibc's heap kept for large allocations, as hiresctl trains "
            "without a memory budget (docs/encoders.md)."
            if kept
            else "; glibc's default allocation (large tensors mapped and unmapped each time)."
            if not gpu
            else "."
        ),
        "",
        "| encoder | patch | training, bf16 | no-grad, bf16 | training, fp32 | no-grad, fp32 | "
        "training, fp32 default layout | no-grad, fp32 default layout |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, sides in ENCODERS.items():
        for side in sides:
            cells = [f"`{name}`", f"{side}²"]
            for precision, layout in SETUPS:
                for kind in ("train", "no_grad"):
                    key = f"{name}|{side}|{precision}|{LAYOUTS[layout]}|{kind}"
                    cells.append(rate_cell(results, "encoders", key))
            lines.append("| " + " | ".join(cells) + " |")
    if not args.skip_methods:
        lines += [
            "",
            "One training step of each classification method, batch 4 of Megapixel MNIST 512² "
            "(`tiny-s2d`, patch 64, IPS M = 8, the methods' defaults; pixels already in memory): "
            "median seconds, GFLOP/s and the share of the convolution ceiling of its precision, "
            "timed beside it as above.",
            "",
            "| method | fp32 | bf16 |",
            "|---|---|---|",
        ]
        for method in METHODS:
            cells = [method]
            for precision in PRECISIONS:
                seconds = statistics.median(
                    r["methods"][f"{method}|{precision}|seconds"] for r in results
                )
                rate = rate_cell(results, "methods", f"{method}|{precision}|rate")
                cells.append(f"{seconds:.2f} s, {rate}")
            lines.append("| " + " | ".join(cells) + " |")
    section = "limits-gpu" if gpu else "limits"
    publish(lines, section + ("-glibc" if args.allocator == "glibc" else ""))


if __name__ == "__main__":
    main()
