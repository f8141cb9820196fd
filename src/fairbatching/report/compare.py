"""The `compare` command's report folder: summaries as JSON, CSV and Markdown, per-request rows, a plot, HTML."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fairbatching.metrics.summary import Summary
from fairbatching.metrics.table import markdown_table, write_summary_csv
from fairbatching.report.html import write_html_report
from fairbatching.report.plots import plot_comparison
from fairbatching.serving.node import IterationLog


def write_comparison(
    folder: Path, title: str, settings: dict[str, Any], summaries: Sequence[Summary], logs: Sequence[IterationLog]
) -> list[Path]:
    """Writes into ``folder`` (a staging folder: the caller renames it when complete); returns the plot and page."""
    (folder / "summary.json").write_text(
        json.dumps({**settings, "results": [s.to_dict() for s in summaries]}, indent=2) + "\n"
    )
    write_summary_csv(summaries, folder / "summary.csv")
    (folder / "summary.md").write_text(f"{title}\n\n{markdown_table(summaries)}\n")
    for s in summaries:
        s.write_requests_csv(folder / f"requests_{s.policy}.csv")
    png = plot_comparison(summaries, logs, folder / "compare.png", title)
    return [png, write_html_report(folder / "report.html", title, summaries, [png], settings)]
