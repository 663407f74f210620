"""``hiresctl eval --report``: one report across runs and tasks (HTML, Markdown, metrics.json)."""

from hiresctl.report.build import build_report

__all__ = ["build_report"]
