"""The report as one self-contained HTML page (figures embedded, no script, no network) and
its Markdown twin (figures as files under ``figures/``)."""

from __future__ import annotations

import datetime as _dt
import html
import math
from typing import Any

import yaml

from hiresctl import __version__
from hiresctl.report import figures
from hiresctl.report.model import METRIC_NAMES, RunReport
from hiresctl.train import get_task

SETTING_COLUMNS = (("input", "Input"), ("patch", "Patch"), ("sampling", "Sampling"))
COST_COLUMNS = (
    "train_peak_gb",
    "train_images_per_second",
    "eval_peak_gb",
    "eval_images_per_second",
    "train_seconds",
)
# Shown only when a run paid for its inputs before training (a stored feature set): the
# extraction's seconds, and the total that compares such a run fairly with the others.
PREPARED_COLUMNS = ("prepared_seconds", "total_seconds")
RECIPE_KEYS = (
    "task",
    "method",
    "backbone",
    "network",
    "pretrained",
    "patch_size",
    "level",
    "latent_dim",
    "batch_size",
    "accumulation_steps",
    "lr",
    "epochs",
    "precision",
    "seed",
)
METHOD_KEYS = {  # the sampling keys that mean something for a method
    "patchgd": ("sample_fraction", "patches_per_step", "inner_steps"),
    "patchgd-global": ("sample_fraction", "patches_per_step", "inner_steps", "fusion"),
    "ips": ("memory_size", "iter_size", "positional"),
    "downsample": ("input_size",),
}


SIZE_RANGES = {"small": "area < 32²", "medium": "32² to 96²", "large": "≥ 96²"}


def recipe_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe keys worth a glance for this run's method (the rest sit in the full recipe)."""
    keys = RECIPE_KEYS + METHOD_KEYS.get(str(recipe.get("method")), ())
    return {k: recipe[k] for k in keys if recipe.get(k) is not None}


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 color:#1d2430;background:#f6f7f9;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6em;margin:.2em 0}h2{margin-top:1.8em;border-bottom:2px solid #d8dde5;
 padding-bottom:.2em}h3{margin-top:1.4em}
.meta{color:#5a6473;font-size:.92em}.verdict{background:#fff;border-left:5px solid #0072B2;
 padding:12px 16px;margin:16px 0;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;margin:8px 0 16px;background:#fff;font-size:.92em}
th,td{border:1px solid #d8dde5;padding:5px 9px;text-align:right;vertical-align:top}
th{background:#eef1f5}td.l,th.l{text-align:left}td.best{font-weight:700;background:#e3f3e8}
.charts,.gallery{display:flex;flex-wrap:wrap;gap:14px}.chart{background:#fff;padding:6px;
 box-shadow:0 1px 2px #0001}.chart svg{font-size:11px;fill:#1d2430}
.chart .plot{fill:#fbfcfd;stroke:#c9d0da}.chart .grid{stroke:#e4e8ee}
.chart .diagonal{stroke:#999;stroke-dasharray:4 3}.chart .chart-title{font-weight:600;font-size:12px}
figure{margin:0;background:#fff;padding:8px;max-width:340px;box-shadow:0 1px 2px #0001}
figure img{max-width:320px;display:block;image-rendering:pixelated}
figcaption{font-size:.82em;color:#3b4554;margin-top:4px}
details{margin:6px 0}pre{background:#fff;padding:10px;overflow:auto;font-size:.85em}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -1px 10px}
.wide{overflow-x:auto;max-width:100%}.wide table{margin-bottom:6px}
.ci{font-size:.8em;color:#5a6473;font-weight:400;white-space:nowrap}
"""


def number_text(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def decimals(column: str) -> int:
    if column in ("train_seconds", *PREPARED_COLUMNS):
        return 0
    return 2 if column in COST_COLUMNS else 4


def charts(metrics: dict[str, Any], reports: list[RunReport]) -> list[tuple[str, str, str]]:
    """(file stem, title, SVG) of every chart: curves across runs, and each run's ROC."""
    task = get_task(metrics["task"])
    monitor = reports[0].summary.get("monitor") or task.table_metrics[0]
    wanted = [
        ("train_loss", "Training loss"),
        (f"val_{monitor}", f"Validation {METRIC_NAMES.get(monitor, monitor)}"),
    ]
    if any("val_loss" in row for r in reports for row in r.curves):
        wanted.insert(1, ("val_loss", "Validation loss"))
    wanted.append(("train_accuracy", task.train_accuracy))
    out = []
    for key, title in wanted:
        series = {
            r.name: [(row["epoch"], row.get(key)) for row in r.curves if "epoch" in row]
            for r in reports
        }
        if any(y is not None for s in series.values() for _, y in s):
            out.append((f"curve-{key}", title, figures.line_chart(series, title, "epoch")))
    if any(r.result.get("pr_curve") for r in reports):  # precision over recall, per IoU
        for key, iou in (("iou50", "0.5"), ("iou75", "0.75")):
            series = {}
            for r in reports:
                curve = r.result.get("pr_curve")
                if curve and any(v is not None for v in curve[key]):
                    series[r.name] = list(zip(curve["recall"], curve[key], strict=True))
            if series:
                title = f"Precision–recall at IoU {iou} (mean over classes)"
                svg = figures.line_chart(series, title, "recall", "precision", limits=(0.0, 1.0))
                out.append((f"pr-{key}", title, svg))
    for r in reports:
        if r.roc:
            series = {f"AUC {r.roc['auc']:.3f}": list(zip(r.roc["fpr"], r.roc["tpr"], strict=True))}
            title = f"ROC of {r.name} (positive: {r.roc['positive']})"
            svg = figures.line_chart(
                series,
                title,
                "false positive rate",
                "true positive rate",
                limits=(0.0, 1.0),
                diagonal=True,
            )
            out.append((f"roc-{figures.slug(r.name)}", title, svg))
    return out


def interval_text(metrics: dict[str, Any], run: str, column: str) -> str:
    """`` [0.712–0.804]``: the 95% interval of the deciding metric's ``column`` for ``run``."""
    found = (metrics.get("intervals") or {}).get(run)
    if column != metrics["deciding_metric"] or not found or found["low"] is None:
        return ""
    if not (math.isfinite(found["low"]) and math.isfinite(found["high"])):
        return ""
    return f" [{found['low']:.3f}–{found['high']:.3f}]"


def comparison_sentences(metrics: dict[str, Any]) -> list[str]:
    """One line per paired comparison of the winner with another run."""
    name = METRIC_NAMES.get(metrics["deciding_metric"], metrics["deciding_metric"])
    out = []
    for c in metrics.get("comparisons") or []:
        p = f"p = {c['p_value']:.2g}" if c["p_value"] >= 0.001 else "p < 0.001"
        verdict = "a real difference" if c["significant"] else "within the test images' noise"
        extra = ""
        if c.get("discordant"):
            a_only, b_only = c["discordant"]
            extra = f"; {a_only} images only {c['a']} gets right, {b_only} only {c['b']}"
        out.append(
            f"{c['a']} − {c['b']}: {name} {c['difference']:+.3f} "
            f"(95% interval {c['low']:+.3f} to {c['high']:+.3f}), {c['test']} {p} over "
            f"{c['images']} images{extra}: {verdict}."
        )
    return out


def _comparison_columns(metrics: dict[str, Any]) -> list[str]:
    rows = metrics["table"].values()
    table = get_task(metrics["task"]).table_metrics
    present = [k for k in table if any(r.get(k) is not None for r in rows)]
    if "auc" in present and "kappa_quadratic" in present:  # binary: κ adds nothing to AUC here
        present.remove("kappa_quadratic")
    prepared = any(r.get("prepared_seconds") is not None for r in rows)
    return present + list(COST_COLUMNS) + (list(PREPARED_COLUMNS) if prepared else [])


def headline(metrics: dict[str, Any]) -> str:
    task = get_task(metrics["task"]).title
    count = len(metrics["runs"])
    return f"{task.capitalize()}: {count} run{'s' if count > 1 else ''} on {metrics['data']} [{metrics['split']}]"


# -------------------------------------------------------------------------------- HTML


def _h(text: Any) -> str:
    return html.escape(str(text))


def _html_table(head: list[str] | None, rows: list[list[tuple[str, str]]], left: int = 1) -> str:
    """``rows`` of (text, css class) cells; the first ``left`` columns align left."""
    out = ["<table>"]
    if head:
        out.append("<thead><tr>")
        out += [f'<th class="{"l" if i < left else ""}">{_h(c)}</th>' for i, c in enumerate(head)]
        out.append("</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>")
        for i, (text, css) in enumerate(row):
            classes = " ".join(c for c in ("l" if i < left else "", css) if c)
            out.append(f'<td class="{classes}">{text}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _confusion_html(matrix: list[list[int]], classes: list[str]) -> str:
    if not matrix or len(matrix) > 40:
        return ""
    top = max((max(row) for row in matrix), default=0) or 1
    out = ['<table><thead><tr><th class="l">true ↓ / predicted →</th>']
    out += [f"<th>{_h(c)}</th>" for c in classes]
    out.append("</tr></thead><tbody>")
    for j, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        out.append(f'<tr><th class="l">{_h(name)}</th>')
        for i, value in enumerate(row):
            strength = value / top
            colour = f"rgba(0,114,178,{0.08 + 0.8 * strength:.2f})" if value else "#fff"
            ink = "#fff" if strength > 0.55 else "#1d2430"
            weight = "font-weight:700;" if i == j else ""
            out.append(f'<td style="background:{colour};color:{ink};{weight}">{value}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _run_section_html(r: RunReport, svgs: dict[str, str]) -> str:
    result = r.result
    out = [f'<h2 id="run-{_h(figures.slug(r.name))}">{_h(r.name)} — {_h(result["method"])}</h2>']
    shown = recipe_settings(r.recipe)
    out.append(
        _html_table(["setting", "value"], [[(_h(k), ""), (_h(v), "")] for k, v in shown.items()], 2)
    )
    out.append(
        "<details><summary>The whole resolved recipe</summary><pre>"
        f"{_h(yaml.safe_dump(r.recipe, sort_keys=False))}</pre></details>"
    )
    train = r.summary
    if train:
        out.append(
            f'<p class="meta">Trained {train.get("epochs")} epochs ({train.get("steps")} steps) '
            f"on {train.get('train_images')} images, {_h(train.get('device'))}, "
            f"{_h(train.get('precision'))}; peak memory {number_text(train.get('peak_memory_gb'), 2)} GB "
            f"({_h(train.get('peak_memory_kind'))}), {number_text(train.get('images_per_second'), 2)} "
            f"images/s, data wait {number_text((train.get('data_wait_fraction') or 0) * 100, 0)}%. "
            f"Best validation {_h(train.get('monitor') or 'accuracy')}: "
            f"{number_text(train.get('best_val', train.get('best_val_accuracy')))}.</p>"
        )
    out.append(f"<h3>Metrics on {_h(result['split'])} ({result['count']} images)</h3>")
    rows = [
        [(_h(METRIC_NAMES.get(k, k)), ""), (number_text(v), "")]
        for k, v in result["metrics"].items()
    ]
    rows.append(
        [
            ("Peak memory (GB)", ""),
            (f"{number_text(result['peak_memory_gb'], 3)} ({_h(result['peak_memory_kind'])})", ""),
        ]
    )
    rows.append([("Images/s", ""), (number_text(result["images_per_second"], 2), "")])
    out.append(_html_table(["metric", "value"], rows))
    if result.get("undefined"):
        undefined = ", ".join(f"{k}: {v}" for k, v in result["undefined"].items() if v)
        if undefined:
            out.append(
                f'<p class="meta">Images where a metric is undefined (counted as 0): {_h(undefined)}.</p>'
            )
    by_size = result.get("by_size")
    if by_size:
        out.append("<h3>COCO metrics by object size</h3>")
        out.append(
            _html_table(
                ["size", "objects", "AP", "AR"],
                [
                    [
                        (_h(f"{name} ({SIZE_RANGES[name]})"), ""),
                        (str(v["objects"]), ""),
                        (number_text(v["ap"]), ""),
                        (number_text(v["ar"]), ""),
                    ]
                    for name, v in by_size.items()
                ],
            )
        )
    per_class = result.get("per_class") or {}
    if per_class:
        out.append("<h3>Per class</h3>")
        head = ["class", *next(iter(per_class.values())).keys()]
        out.append(
            _html_table(
                head,
                [
                    [(_h(n), ""), *((number_text(v), "") for v in vals.values())]
                    for n, vals in per_class.items()
                ],
            )
        )
    if result.get("confusion_matrix"):
        what = get_task(result["task"]).judged
        out.append(f"<h3>Confusion matrix ({what})</h3>")
        out.append(_confusion_html(result["confusion_matrix"], result["classes"]))
    roc = svgs.get(f"roc-{figures.slug(r.name)}")
    if roc:
        out.append(f'<h3>ROC</h3><div class="chart">{roc}</div>')
    if r.shown:
        task = get_task(result["task"])
        out.append(f"<h3>{task.worst_images}</h3>")
        if task.legend:
            tp, fp, fn = task.legend
            out.append(
                '<p class="legend">'
                f'<span style="background:rgb{figures.TP}"></span>{tp}'
                f'<span style="background:rgb{figures.FP}"></span>{fp}'
                f'<span style="background:rgb{figures.FN}"></span>{fn}</p>'
            )
        out.append('<div class="gallery">')
        for fig in r.shown:
            img = f'<img src="{fig.uri}" alt="{_h(fig.caption)}">'
            if fig.link:
                img = f'<a href="{_h(fig.link)}">{img}</a>'
            out.append(f"<figure>{img}<figcaption>{_h(fig.caption)}</figcaption></figure>")
        out.append("</div>")
    if result.get("skipped"):
        out.append(f'<p class="meta">Skipped: {_h("; ".join(result["skipped"]))}</p>')
    return "".join(out)


def split_columns(metrics: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The side-by-side columns as two tables that each fit a laptop's width: what each run
    reached (with what it saw), and what it cost."""
    columns = _comparison_columns(metrics)
    costs = [c for c in columns if c in COST_COLUMNS or c in PREPARED_COLUMNS]
    return [c for c in columns if c not in costs], costs


def _html_run_rows(
    metrics: dict[str, Any], reports: list[RunReport], columns: list[str], settings: bool
) -> tuple[list[str], list[list[tuple[str, str]]]]:
    best = metrics["best"]
    head = ["Run", "Method"]
    head += [t for _, t in SETTING_COLUMNS] if settings else []
    head += [METRIC_NAMES.get(c, c) for c in columns]
    rows = []
    for r in reports:
        row = metrics["table"][r.name]
        cells = [
            (f'<a href="#run-{_h(figures.slug(r.name))}">{_h(r.name)}</a>', ""),
            (_h(r.result["method"]), ""),
        ]
        if settings:
            cells += [(_h(r.setting.get(k, "—")), "") for k, _ in SETTING_COLUMNS]
        for c in columns:
            won = r.name in best.get(c, [])
            text = number_text(row.get(c), decimals(c)) + (" ★" if won else "")
            interval = interval_text(metrics, r.name, c)
            if interval:
                text += f'<br><span class="ci">{_h(interval.strip())}</span>'
            cells.append((text, "best" if won else ""))
        rows.append(cells)
    return head, rows


def render_html(metrics: dict[str, Any], reports: list[RunReport]) -> str:
    svgs = {stem: svg for stem, _, svg in charts(metrics, reports)}
    quality, costs = split_columns(metrics)
    head, rows = _html_run_rows(metrics, reports, quality, settings=True)
    cost_head, cost_rows = _html_run_rows(metrics, reports, costs, settings=False)
    data = metrics["dataset"]
    size = (
        f"{data['smallest'][0]}×{data['smallest'][1]} to {data['largest'][0]}×{data['largest'][1]}"
        if data["smallest"]
        else "—"
    )
    splits = ", ".join(f"{k}: {v}" for k, v in sorted(data["splits"].items()))
    curves = "".join(
        f'<div class="chart">{svg}</div>'
        for stem, _, svg in charts(metrics, reports)
        if stem.startswith("curve-")
    )
    pr = "".join(
        f'<div class="chart">{svg}</div>' for stem, svg in svgs.items() if stem.startswith("pr-")
    )
    created = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = [
        f"<h1>{_h(headline(metrics))}</h1>",
        f'<p class="meta">hiresctl {__version__} · {created} · deciding metric: '
        f"{_h(METRIC_NAMES.get(metrics['deciding_metric'], metrics['deciding_metric']))} · "
        "★ marks the best value of a column (lowest for memory and NLR)</p>",
        f'<div class="verdict">{_h(metrics["verdict"])}</div>',
        "<h2>Runs side by side</h2>",
        '<div class="wide">',
        _html_table(head, rows, left=2 + len(SETTING_COLUMNS)),
        "</div>",
        *(
            [
                '<p class="meta">Brackets: 95% bootstrap interval over the test images '
                "(2000 resamples).</p>"
            ]
            if metrics.get("intervals")
            else []
        ),
        "<h3>What each run cost</h3>",
        '<div class="wide">',
        _html_table(cost_head, cost_rows, left=2),
        "</div>",
        *(
            [
                "<h3>Is the difference real?</h3><ul>",
                *(f"<li>{_h(line)}</li>" for line in comparison_sentences(metrics)),
                "</ul>",
            ]
            if metrics.get("comparisons")
            else []
        ),
        *(["<h2>Precision–recall</h2>", f'<div class="charts">{pr}</div>'] if pr else []),
        "<h2>Training</h2>",
        f'<div class="charts">{curves}</div>' if curves else "<p>No training curves recorded.</p>",
        "<h2>Dataset</h2>",
        _html_table(
            None,
            [
                [("store", ""), (_h(data["path"]), "")],
                [("images (complete)", ""), (str(data["images"]), "")],
                [("splits", ""), (_h(splits), "")],
                [("classes", ""), (_h(", ".join(map(str, data["classes"]))), "")],
                [("image size (level 0)", ""), (_h(size), "")],
                [("pixel size (µm)", ""), (_h(", ".join(map(str, data["mpp"])) or "—"), "")],
            ],
            left=2,
        ),
    ]
    body += [_run_section_html(r, svgs) for r in reports]
    body.append(
        '<p class="meta">Numbers: metrics.json beside this page. '
        "Images link to their full thumbnails under figures/.</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{_h(headline(metrics))}</title><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )
