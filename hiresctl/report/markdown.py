"""The report as Markdown (``report.md``): the same sections as the HTML page, for a README, a
pull request or a terminal."""

from __future__ import annotations

from typing import Any

from hiresctl.report import figures
from hiresctl.report.model import METRIC_NAMES, RunReport
from hiresctl.report.render import (
    SETTING_COLUMNS,
    SIZE_RANGES,
    charts,
    comparison_sentences,
    decimals,
    headline,
    interval_text,
    number_text,
    recipe_settings,
    split_columns,
)
from hiresctl.train import get_task


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(clean(h) for h in head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _md_run_rows(
    metrics: dict[str, Any], reports: list[RunReport], columns: list[str], settings: bool
) -> str:
    best = metrics["best"]
    rows = []
    for r in reports:
        row = metrics["table"][r.name]
        cells = [r.name, r.result["method"]]
        cells += [r.setting.get(k, "—") for k, _ in SETTING_COLUMNS] if settings else []
        for c in columns:
            text = number_text(row.get(c), decimals(c))
            text = f"**{text} ★**" if r.name in best.get(c, []) else text
            cells.append(text + interval_text(metrics, r.name, c))
        rows.append(cells)
    head = ["Run", "Method"]
    head += [t for _, t in SETTING_COLUMNS] if settings else []
    head += [METRIC_NAMES.get(c, c) for c in columns]
    return _md_table(head, rows)


def render_markdown(metrics: dict[str, Any], reports: list[RunReport]) -> str:
    quality, costs = split_columns(metrics)
    out = [
        f"# {headline(metrics)}\n",
        f"Deciding metric: {METRIC_NAMES.get(metrics['deciding_metric'])}; **bold ★** marks the "
        "best value of a column (lowest for memory and NLR).\n",
        f"> {metrics['verdict']}\n",
        "## Runs side by side\n",
    ]
    out.append(_md_run_rows(metrics, reports, quality, settings=True))
    if metrics.get("intervals"):
        out.append("Brackets: 95% bootstrap interval over the test images (2000 resamples).\n")
    out.append("### What each run cost\n")
    out.append(_md_run_rows(metrics, reports, costs, settings=False))
    if metrics.get("comparisons"):
        out.append("### Is the difference real?\n")
        out += [f"- {line}" for line in comparison_sentences(metrics)]
        out.append("")
    pr = [(stem, title) for stem, title, _ in charts(metrics, reports) if stem.startswith("pr-")]
    if pr:
        out.append("## Precision–recall\n")
        out += [f"![{title}](figures/{stem}.svg)\n" for stem, title in pr]
    out.append("## Training\n")
    for stem, title, _ in charts(metrics, reports):
        if stem.startswith("curve-"):
            out.append(f"![{title}](figures/{stem}.svg)\n")
    data = metrics["dataset"]
    out.append("## Dataset\n")
    out.append(
        f"{data['path']}: {data['images']} complete images "
        f"({', '.join(f'{k} {v}' for k, v in sorted(data['splits'].items()))}); classes "
        f"{', '.join(map(str, data['classes']))}.\n"
    )
    for r in reports:
        result = r.result
        out.append(f"## {r.name} — {result['method']}\n")
        shown = recipe_settings(r.recipe)
        out.append(_md_table(["setting", "value"], [[k, str(v)] for k, v in shown.items()]))
        out.append(f"### Metrics on {result['split']} ({result['count']} images)\n")
        rows = [[METRIC_NAMES.get(k, k), number_text(v)] for k, v in result["metrics"].items()]
        rows.append(
            [
                "Peak memory (GB)",
                f"{number_text(result['peak_memory_gb'], 3)} ({result['peak_memory_kind']})",
            ]
        )
        rows.append(["Images/s", number_text(result["images_per_second"], 2)])
        out.append(_md_table(["metric", "value"], rows))
        by_size = result.get("by_size")
        if by_size:
            out.append("### COCO metrics by object size\n")
            out.append(
                _md_table(
                    ["size", "objects", "AP", "AR"],
                    [
                        [
                            f"{name} ({SIZE_RANGES[name]})",
                            str(v["objects"]),
                            number_text(v["ap"]),
                            number_text(v["ar"]),
                        ]
                        for name, v in by_size.items()
                    ],
                )
            )
        per_class = result.get("per_class") or {}
        if per_class:
            out.append("### Per class\n")
            head = ["class", *next(iter(per_class.values())).keys()]
            out.append(
                _md_table(
                    head,
                    [
                        [n, *(number_text(v) for v in vals.values())]
                        for n, vals in per_class.items()
                    ],
                )
            )
        matrix = result.get("confusion_matrix")
        if matrix and len(matrix) <= 40:
            out.append("### Confusion matrix (rows: true, columns: predicted)\n")
            out.append(
                _md_table(
                    ["", *map(str, result["classes"])],
                    [
                        [str(n), *map(str, row)]
                        for n, row in zip(result["classes"], matrix, strict=True)
                    ],
                )
            )
        if r.roc:
            out.append(f"![ROC](figures/roc-{figures.slug(r.name)}.svg)\n")
        if r.shown:
            out.append("### Worst images\n")
            legend = get_task(result["task"]).legend
            if legend:
                tp, fp, fn = legend
                out.append(f"Green: {tp}; red: {fp}; blue: {fn}.\n")
            for fig in r.shown:
                link = f" ([thumbnail]({fig.link}))" if fig.link else ""
                out.append(f"![{fig.caption}]({fig.path})  \n{fig.caption}{link}\n")
    out.append("Numbers: `metrics.json` beside this file.\n")
    return "\n".join(out)


__all__ = ["render_markdown"]
