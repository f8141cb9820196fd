"""Side-by-side summary tables for the terminal (rich) and for CSV.

The terminal shows the columns a person compares policies by (``DEFAULT_COLUMNS``, under 100 characters
wide); ``wide=True`` shows all of them. Files (CSV, markdown, JSON) always carry every field.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
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
    ("rejected + timeout", "failed", "{:d}"),
]


# What decides between policies: typical and tail TTFT, mean TPOT, how many met both SLOs, and goodput.
DEFAULT_COLUMNS: list[tuple[str, str, str]] = [
    c for c in COLUMNS if c[1] in ("ttft.p50", "ttft.p99", "tpot.mean", "slo_attainment", "goodput_rps")
]


HIT_COLUMN = ("prefix hit", "prefix_hit_rate", "pct")


def _with_hits(columns: list[tuple[str, str, str]], summaries: Sequence[Summary]) -> list[tuple[str, str, str]]:
    """The columns, plus the prefix-cache hit rate when any run cached prefixes (tables without stay as they were)."""
    if any(s.prefix_hit_rate is not None for s in summaries):
        return [*columns, HIT_COLUMN]
    return columns


def value(s: Summary, key: str) -> float:
    if key == "failed":
        return s.rejected + s.timed_out
    head, _, tail = key.partition(".")
    v = getattr(s, head)
    if v is None:  # a prefix hit rate beside runs without caching
        return float("nan")
    return getattr(v, tail) if tail else v


def _fmt(v: float, fmt: str) -> str:
    if v != v:  # NaN
        return "-"
    if fmt == "ms":
        return f"{v * 1e3:.1f}"
    if fmt == "pct":
        return f"{v * 100:.1f}%"
    return fmt.format(v)


def summary_table(summaries: Sequence[Summary], title: str = "", wide: bool = False) -> Table:
    """Values are never cut: each column is at least as wide as its widest value, and headers wrap instead."""
    columns = _with_hits(COLUMNS if wide else DEFAULT_COLUMNS, summaries)
    rows = [[s.policy, *(_fmt(value(s, k), f) for _, k, f in columns)] for s in summaries]
    table = Table(title=title or None)
    for i, header in enumerate(["policy", *(h for h, _, _ in columns)]):
        widest = max([len(r[i]) for r in rows] + [len(word) for word in header.split()])
        table.add_column(
            header, justify="left" if i == 0 else "right", style="bold" if i == 0 else None, min_width=widest
        )
    for row in rows:
        table.add_row(*row)
    return table


def show(console: Console, table: Table) -> None:
    """Print ``table`` whole: on a terminal too narrow for it (``--wide``), lines run on rather than cutting
    columns off."""
    needed = Measurement.get(console, console.options, table).minimum
    console.print(table, width=max(console.width, needed))


def write_summary_csv(summaries: Sequence[Summary], path: str | Path) -> None:
    columns = _with_hits(COLUMNS, summaries)
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "workload", "requests", *(k for _, k, _ in columns)])
        for s in summaries:
            w.writerow([s.policy, s.workload, s.requests, *(value(s, k) for _, k, _ in columns)])


def markdown_table(summaries: Sequence[Summary]) -> str:
    columns = _with_hits(COLUMNS, summaries)
    head = "| policy | " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    rows = [f"| {s.policy} | " + " | ".join(_fmt(value(s, k), f) for _, k, f in columns) + " |" for s in summaries]
    return "\n".join([head, sep, *rows])


def shapes_table(shapes: Sequence[dict]) -> Table:
    """Traces side by side: size, span, rate and length percentiles (``bundled_shapes`` rows)."""
    table = Table()
    for header in ("trace", "requests", "min", "req/s", "prompt p50/90/99", "output p50/90/99", "license"):
        table.add_column(header, justify="left" if header in ("trace", "license") else "right")
    for s in shapes:
        table.add_row(
            s["name"],
            str(s["requests"]),
            f"{s['duration_s'] / 60:.0f}",
            f"{s['qps']:.2f}",
            "/".join(f"{s[f'prompt_p{q}']:.0f}" for q in (50, 90, 99)),
            "/".join(f"{s[f'output_p{q}']:.0f}" for q in (50, 90, 99)),
            s["license"],
        )
    return table
