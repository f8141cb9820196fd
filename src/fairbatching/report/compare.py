"""The `compare` command's report folder: summaries as JSON, CSV and Markdown, per-request rows, a plot, HTML.

On a real backend (``--backend gpu``) each policy's summary has the simulator's for the same run beside it:
in ``summary.json`` (``sim``), in ``sim_vs_gpu.csv``, and as a second table in the Markdown and HTML."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from fairbatching.metrics.summary import Summary
from fairbatching.metrics.table import COLUMNS, _fmt, class_markdown, markdown_table, value, write_summary_csv
from fairbatching.report.html import class_section, html_table, write_html_page, write_html_report
from fairbatching.report.plots import plot_comparison
from fairbatching.serving.node import IterationLog

# The columns shown measured and simulated side by side (every column's pair is in sim_vs_gpu.csv).
SIM_TITLE = "measured / simulated (the same requests and profile on the simulator)"
SIM_COLUMNS = [c for c in COLUMNS if c[1] in ("ttft.p50", "ttft.p99", "tpot.mean", "slo_attainment", "goodput_rps")]


def write_comparison(
    folder: Path,
    title: str,
    settings: dict[str, Any],
    summaries: Sequence[Summary],
    logs: Sequence[IterationLog],
    sims: Sequence[Summary] | None = None,
) -> list[Path]:
    """Writes into ``folder`` (a staging folder: the caller renames it when complete); returns the plot and page.
    ``sims``: the simulator's summary of each run, when the runs were on a real backend."""
    results = [s.to_dict() for s in summaries]
    if sims is not None:
        results = [{**r, "sim": sim.to_dict()} for r, sim in zip(results, sims, strict=True)]
    (folder / "summary.json").write_text(json.dumps({**settings, "results": results}, indent=2) + "\n")
    write_summary_csv(summaries, folder / "summary.csv")
    md = f"{title}\n\n{markdown_table(summaries)}\n"
    if classes := class_markdown(summaries):
        md += f"\nPer SLO class:\n\n{classes}\n"
    if sims is not None:
        _write_sim_csv(summaries, sims, folder / "sim_vs_gpu.csv")
        header, rows = sim_rows(summaries, sims)
        table = [header, ["---", *["---:"] * (len(header) - 1)], *rows]
        md += f"\n{SIM_TITLE}\n\n"
        md += "".join("| " + " | ".join(r) + " |\n" for r in table)
    (folder / "summary.md").write_text(md)
    for s in summaries:
        s.write_requests_csv(folder / f"requests_{s.policy}.csv")
    png = plot_comparison(summaries, logs, folder / "compare.png", title)
    if sims is None:
        return [png, write_html_report(folder / "report.html", title, summaries, [png], settings)]
    measured = [[s.policy, *(_fmt(value(s, k), f) for _, k, f in COLUMNS)] for s in summaries]
    main = html_table(["policy", *(h for h, _, _ in COLUMNS)], measured)
    body = f"{main}{class_section(summaries)}<h2>{SIM_TITLE}</h2>{html_table(*sim_rows(summaries, sims))}"
    return [png, write_html_page(folder / "report.html", title, body, [png], settings)]


def sim_rows(summaries: Sequence[Summary], sims: Sequence[Summary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per policy, each of ``SIM_COLUMNS`` as "measured / simulated"."""
    header = ["policy", *(h for h, _, _ in SIM_COLUMNS)]
    rows = [
        [s.policy, *(f"{_fmt(value(s, k), f)} / {_fmt(value(sim, k), f)}" for _, k, f in SIM_COLUMNS)]
        for s, sim in zip(summaries, sims, strict=True)
    ]
    return header, rows


def sim_table(summaries: Sequence[Summary], sims: Sequence[Summary]) -> Table:
    """The terminal's measured-beside-simulated table."""
    header, rows = sim_rows(summaries, sims)
    table = Table(title=SIM_TITLE)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
    for row in rows:
        table.add_row(*row)
    return table


def _write_sim_csv(summaries: Sequence[Summary], sims: Sequence[Summary], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", *(f"{k}{side}" for _, k, _ in COLUMNS for side in ("", "_sim"))])
        for s, sim in zip(summaries, sims, strict=True):
            w.writerow([s.policy, *(value(x, k) for _, k, _ in COLUMNS for x in (s, sim))])
