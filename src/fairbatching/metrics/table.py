"""Side-by-side summary tables for the terminal (rich) and for CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from fairbatching.metrics.summary import Summary

# (header, how to read it off a Summary, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("TTFT p50 (s)", "ttft.p50", "{:.3f}"),
    ("TTFT p99 (s)", "ttft.p99", "{:.3f}"),
    ("TPOT mean (ms)", "tpot.mean", "ms"),
    ("TPOT p99 (ms)", "tpot.p99", "ms"),
    ("TBT p99 (ms)", "tbt.p99", "ms"),
    ("TTFT ok", "ttft_attainment", "pct"),
    ("TPOT ok", "tpot_attainment", "pct"),
    ("SLO ok", "slo_attainment", "pct"),
    ("goodput (req/s)", "goodput_rps", "{:.2f}"),
    ("tok/s", "throughput_tok_s", "{:.0f}"),
    ("GPU busy", "gpu_busy", "pct"),
    ("preempt", "preemptions", "{:d}"),
    ("rejected+timeout", "failed", "{:d}"),
]


def value(s: Summary, key: str) -> float:
    if key == "failed":
        return s.rejected + s.timed_out
    head, _, tail = key.partition(".")
    v = getattr(s, head)
    return v[tail] if tail else v


def _fmt(v: float, fmt: str) -> str:
    if v != v:  # NaN
        return "-"
    if fmt == "ms":
        return f"{v * 1e3:.1f}"
    if fmt == "pct":
        return f"{v * 100:.1f}%"
    return fmt.format(v)


def summary_table(summaries: Sequence[Summary], title: str = "") -> Table:
    table = Table(title=title or None)
    table.add_column("policy", style="bold")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for s in summaries:
        table.add_row(s.policy, *(_fmt(value(s, k), f) for _, k, f in COLUMNS))
    return table


def write_summary_csv(summaries: Sequence[Summary], path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "workload", "requests", *(k for _, k, _ in COLUMNS)])
        for s in summaries:
            w.writerow([s.policy, s.workload, s.requests, *(value(s, k) for _, k, _ in COLUMNS)])


def markdown_table(summaries: Sequence[Summary]) -> str:
    head = "| policy | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    rows = [f"| {s.policy} | " + " | ".join(_fmt(value(s, k), f) for _, k, f in COLUMNS) + " |" for s in summaries]
    return "\n".join([head, sep, *rows])
