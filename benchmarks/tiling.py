"""Tiling benchmarks T1-T3 with their targets (BENCHMARKS.md), side by side in one run.

    python benchmarks/tiling.py [--side 16384] [--big-side 40960] [--repeats 3]

T1  hiresctl tile --codec jpeg    vs  vips tiffsave --tile --pyramid --compression jpeg --Q 90
T2  hiresctl tile (zstd)          vs  a hand-written tifffile + dask + zarr route
T3  peak RSS of hiresctl tile on a --big-side source (and on the --side one, to show it is flat)

Inputs are WSI-like pyramidal JPEG TIFFs generated from scikit-image's immunohistochemistry
photograph (tissue on about half the area, white background); they go to benchmarks/data/
(ignored by git). Results are appended as a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import publish  # noqa: E402

TILE = 256


def make_slide(path: Path, side: int) -> Path:
    """A pyramidal JPEG TIFF written tile by tile (never the whole image in memory)."""
    import tifffile
    from skimage.data import immunohistochemistry

    if path.exists():
        return path
    texture = immunohistochemistry()  # 512x512 RGB stained tissue
    rng = np.random.default_rng(0)
    center, radius = side / 2, side * 0.4  # disc covering ~50% of the square

    def tiles(level_side: int, scale: int):
        for ty in range(0, level_side, TILE):
            for tx in range(0, level_side, TILE):
                yy, xx = np.mgrid[ty : ty + TILE, tx : tx + TILE] * scale
                inside = (yy - center) ** 2 + (xx - center) ** 2 < radius**2
                oy, ox = rng.integers(0, 512 - TILE, size=2)
                tile = texture[oy : oy + TILE, ox : ox + TILE].copy()
                if rng.random() < 0.5:
                    tile = tile[::-1]
                tile[~inside] = 245
                yield tile

    tmp = path.with_suffix(".partial")
    levels = []
    s = side
    while s >= TILE * 2:
        levels.append(s)
        s //= 2
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, level_side in enumerate(levels):
            tw.write(
                tiles(level_side, side // level_side),
                shape=(level_side, level_side, 3),
                dtype="uint8",
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subifds=len(levels) - 1 if i == 0 else None,
                subfiletype=1 if i else 0,
                resolution=(1e4 / 0.25, 1e4 / 0.25),
                resolutionunit="CENTIMETER",
            )
    tmp.rename(path)
    return path


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a command and its children, polled every 20 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(
                c.memory_info().rss for c in ps.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
        )
    return seconds, peak / 1e9


HANDWRITTEN = r"""
import sys, dask.array as da, numpy as np, tifffile, zarr
from zarr.codecs import ZstdCodec
src, out = sys.argv[1], sys.argv[2]
store = tifffile.imread(src, aszarr=True, level=0)
arr = da.from_zarr(zarr.open_array(store, mode="r")).rechunk((256, 256, 3))
root = zarr.open_group(out, mode="w")
level = 0
while True:
    target = root.create_array(str(level), shape=arr.shape, chunks=(256, 256, 3), dtype="uint8",
                               compressors=[ZstdCodec(level=3)])
    da.store(arr, target, lock=False)
    if max(arr.shape[:2]) <= 1024:
        break
    src_level = da.from_zarr(target)
    h, w = (s - s % 2 for s in src_level.shape[:2])
    arr = da.coarsen(np.mean, src_level[:h, :w].astype("f4"), {0: 2, 1: 2}).round().astype("uint8").rechunk((256, 256, 3))
    level += 1
"""


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def bench_side_by_side(commands, repeats: int, out: Path) -> list[tuple[float, float, int]]:
    """Median seconds, max peak RSS and output bytes per (name, command factory). The commands
    take turns, round after round, so a slow spell of a shared machine falls on all alike."""
    times: list[list[float]] = [[] for _ in commands]
    peaks: list[list[float]] = [[] for _ in commands]
    sizes = [0 for _ in commands]
    for _ in range(repeats):
        for i, (name, cmd_factory) in enumerate(commands):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            seconds, peak = run_timed(cmd_factory())
            times[i].append(seconds)
            peaks[i].append(peak)
            sizes[i] = output_bytes(out)
            print(
                f"  {name}: {seconds:.2f} s, peak RSS {peak:.2f} GB, output {sizes[i] / 1e6:.0f} MB",
                flush=True,
            )
    return [
        (statistics.median(t), max(p), size) for t, p, size in zip(times, peaks, sizes, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=16384)
    parser.add_argument("--big-side", type=int, default=40960)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    hires = [sys.executable, "-m", "hiresctl", "tile"]
    print(f"generating {args.side}² slide", flush=True)
    slide = make_slide(DATA / f"slide_{args.side}.tif", args.side)
    rows = []
    out = DATA / "out"
    vips = shutil.which("vips")
    if vips is None:
        sys.exit("vips not found: apt-get install libvips-tools")

    print("T1: JPEG store vs vips tiffsave", flush=True)
    hires_jpeg = [
        *hires,
        str(slide),
        "--out",
        str(out / "h.zarr"),
        "--codec",
        "jpeg",
        "--jpeg-quality",
        "90",
    ]
    vips_jpeg = [
        vips,
        "tiffsave",
        str(slide),
        str(out / "v.tif"),
        "--tile",
        "--pyramid",
        "--compression",
        "jpeg",
        "--Q",
        "90",
        "--tile-width",
        "256",
        "--tile-height",
        "256",
    ]
    hires_copy = [*hires, str(slide), "--out", str(out / "h.zarr"), "--codec", "passthrough"]
    (t_h, m_h, s_h), (t_c, m_c, s_c), (t_v, m_v, s_v) = bench_side_by_side(
        [
            ("hiresctl --codec jpeg", lambda: hires_jpeg),
            ("hiresctl --codec passthrough", lambda: hires_copy),
            ("vips tiffsave", lambda: vips_jpeg),
        ],
        args.repeats,
        out,
    )
    rows.append(
        (
            "T1",
            f"{args.side}² JPEG → JPEG pyramid",
            "`vips tiffsave --tile --pyramid --compression jpeg --Q 90`",
            t_h,
            t_v,
            m_h,
            m_v,
            "≤ 1.0×",
            s_h,
            s_v,
        )
    )
    rows.append(
        (
            "T1p",
            f"{args.side}² JPEG → pyramid, tiles copied",
            "the same vips run",
            t_c,
            t_v,
            m_c,
            m_v,
            "≤ 0.25× vips",
            s_c,
            s_v,
        )
    )
    notes = [jpeg_colour_note(out / "v.tif", slide)]  # the last command run was vips
    notes.append(passthrough_note(slide, hires_copy, out, s_c))

    print("T2: lossless store vs hand-written tifffile+dask+zarr", flush=True)
    script = DATA / "handwritten.py"
    script.write_text(HANDWRITTEN)
    (t_h2, m_h2, s_h2), (t_p, m_p, s_p) = bench_side_by_side(
        [
            (
                "hiresctl (zstd)",
                lambda: [*hires, str(slide), "--out", str(out / "h.zarr"), "--codec", "zstd"],
            ),
            (
                "tifffile+dask+zarr",
                lambda: [sys.executable, str(script), str(slide), str(out / "p.zarr")],
            ),
        ],
        args.repeats,
        out,
    )
    rows.append(
        (
            "T2",
            f"{args.side}² JPEG → lossless pyramid",
            "tifffile aszarr → dask rechunk → zarr, coarsen per level",
            t_h2,
            t_p,
            m_h2,
            m_p,
            "≥ 5× faster",
            s_h2,
            s_p,
        )
    )

    if not args.skip_big:
        print(f"T3: peak RSS on a {args.big_side}² source", flush=True)
        big = make_slide(DATA / f"slide_{args.big_side}.tif", args.big_side)
        [(t_b, m_b, s_b)] = bench_side_by_side(
            [
                (
                    "hiresctl (zstd) big",
                    lambda: [*hires, str(big), "--out", str(out / "h.zarr"), "--codec", "zstd"],
                )
            ],
            1,
            out,
        )
        rows.append(
            (
                "T3",
                f"{args.big_side}² JPEG → lossless pyramid",
                "—",
                t_b,
                float("nan"),
                m_b,
                float("nan"),
                "< 1.5 GB, flat",
                s_b,
                float("nan"),
            )
        )
    shutil.rmtree(out, ignore_errors=True)
    write_table(rows, args, notes)


def jpeg_colour(path: Path) -> str:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.photometric.name == "YCBCR":
            return f"YCbCr, subsampling {page.subsampling}"
        return f"{page.photometric.name}, no chroma subsampling"


def jpeg_colour_note(vips_output: Path, source: Path) -> str:
    """How each side of T1 stores its JPEG tiles (their sizes differ for this reason)."""
    return (
        f"T1 output: the source's JPEG tiles are {jpeg_colour(source)}; vips writes "
        f"{jpeg_colour(vips_output)}; hiresctl's chunks are baseline YCbCr JPEGs with "
        "libjpeg-turbo's default subsampling (2, 2), hence its smaller store."
    )


def slide_jpeg_bytes(slide: Path) -> int:
    """The JPEG tiles' bytes of every level of the slide (what a copy can at best take)."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        return sum(sum(level.keyframe.databytecounts) for level in tif.series[0].levels)


def passthrough_note(slide: Path, command: list[str], out: Path, store_bytes: int) -> str:
    """Tile once more with pass-through and check level 0 against tifffile's decode of the
    slide, on the four corner chunks and one in the middle; the store's size beside the
    slide's JPEG bytes."""
    import tifffile
    import zarr

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run(command, check=True, capture_output=True)
    group = zarr.open_group(out / "h.zarr" / "images" / slide.stem, mode="r")
    copied = group.attrs["hiresctl"]["copied_levels"]
    level0 = group["0"]
    with tifffile.TiffFile(slide) as tif:
        theirs = zarr.open_array(tif.series[0].aszarr(level=0), mode="r")
        _, height, width = level0.shape
        for y, x in (
            (0, 0),
            (0, width - 256),
            (height - 256, 0),
            (height - 256, width - 256),
            (height // 2, width // 2),
        ):
            ours = np.asarray(level0[:, y : y + 256, x : x + 256])
            if not np.array_equal(
                ours, np.asarray(theirs[y : y + 256, x : x + 256]).transpose(2, 0, 1)
            ):
                raise SystemExit(
                    f"pass-through level 0 differs from tifffile's decode at y={y} x={x}"
                )
    jpeg = slide_jpeg_bytes(slide)
    ratio = store_bytes / jpeg
    levels = group.attrs["hiresctl"]["levels"]
    rest = (
        "the rest computed, JPEG q 90" if copied < levels else "all of them; the thumbnail computed"
    )
    return (
        f"T1p: `hiresctl tile --codec passthrough` copied levels 0–{copied - 1} of "
        f"{levels} ({rest}); level 0 equals "
        f"tifffile's decode of the slide (5 chunks checked); store {store_bytes / 1e6:.0f} MB "
        f"= {ratio:.2f}× the slide's JPEG tile bytes ({jpeg / 1e6:.0f} MB; target ≤ 1.1×: "
        f"**{'met' if ratio <= 1.1 else 'not met'}**)."
    )


def verdict(row: str, t_h: float, t_p: float, m_h: float, rows) -> str:
    """Whether a row meets its BENCHMARKS.md target, from the measured numbers."""
    if row == "T1p":
        return f"≤ 0.25× vips: **{'met' if t_h <= 0.25 * t_p else 'not met'}** ({t_h / t_p:.2f}×)"
    if row == "T1":
        return "≤ 1.0× vips: **met**" if t_h <= t_p else "≤ 1.0× vips: **not met**"
    if row == "T2":
        return "≥ 5× faster: **met**" if t_p / t_h >= 5 else "≥ 5× faster: **not met**"
    small = next((r[5] for r in rows if r[0] == "T2"), float("nan"))
    # flat: far from proportional to pixels (6.25× more from 16384² to 40960²)
    flat = m_h <= 1.5 * small
    return f"< 1.5 GB, flat (≤ 1.5× the T2 peak): **{'met' if m_h < 1.5 and flat else 'not met'}**"


def write_table(rows, args, notes: list[str]) -> None:
    cpu = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or platform.machine()}"
    lines = [
        f"## Tiling (T1–T3), {time.strftime('%Y-%m-%d')}, {cpu}\n",
        f"Command: `python benchmarks/tiling.py --side {args.side} --big-side {args.big_side} --repeats {args.repeats}`; "
        f"input: a {args.side}² pyramidal JPEG TIFF (Q90, 256² tiles) made from scikit-image's "
        "immunohistochemistry photograph, tissue on ~50% of the area; "
        f"medians of {args.repeats} runs; peak RSS includes child processes.\n",
        "| row | input | peer | hiresctl s | peer s | speed-up (peer/hiresctl) | hiresctl peak GB | peer peak GB | hiresctl output MB | peer output MB | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, what, peer, t_h, t_p, m_h, m_p, _target, s_h, s_p in rows:
        has_peer = t_p == t_p  # NaN when the row has no peer
        ratio = f"{t_p / t_h:.2f}×" if has_peer else "—"
        peer_s = f"{t_p:.2f}" if has_peer else "—"
        peer_m = f"{m_p:.2f}" if m_p == m_p else "—"
        peer_out = f"{s_p / 1e6:.0f}" if s_p == s_p else "—"
        lines.append(
            f"| {row} | {what} | {peer} | {t_h:.2f} | {peer_s} | {ratio} | {m_h:.2f} | {peer_m} | {s_h / 1e6:.0f} | {peer_out} | {verdict(row, t_h, t_p, m_h, rows)} |"
        )
    lines += ["", *notes]
    publish(lines, "tiling")


if __name__ == "__main__":
    main()
