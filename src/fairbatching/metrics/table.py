"""Tables for the terminal (rich) and for CSV/markdown.

A terminal table fits the width it is printed at, down to 80 columns: what a user types back (a policy, trace
or profile name) and every number are printed whole, headers wrap between words, descriptions are cut with an
ellipsis, and optional columns are dropped, least useful first, before anything else would be cut.
``wide=True`` keeps every column (descriptions in full, wrapped) and lets lines run past the terminal rather
than cut. The summary shows the columns a person compares policies by (``DEFAULT_COLUMNS``) and, when any
request was refused or timed out, how many. Files (CSV, markdown, JSON) always carry every field.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console, ConsoleOptions, RenderResult
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
    ("refused", "rejected", "{:d}"),
    ("timed out", "timed_out", "{:d}"),
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


# A description narrower than this says too little to keep: its column is dropped instead.
TEXT_MIN = 16


@dataclass
class Column:
    """One column of a ``FittedTable``. ``kind``: "name" (what a user types back) and "value" are never cut;
    "text" is cut with an ellipsis (wrapped in full when wide). ``drop``: 0 always shown; on a narrow terminal
    the highest ``drop`` goes first."""

    header: str
    cells: list[str]
    kind: Literal["name", "value", "text"] = "value"
    justify: Literal["left", "right"] = "right"
    drop: int = 0
    style: str | None = None

    @property
    def natural(self) -> int:
        return max([len(self.header), *map(len, self.cells)])

    @property
    def least(self) -> int:
        """The narrowest this column can be without cutting a name, a number or a header word."""
        word = max(len(w) for w in self.header.split() or [""])
        if self.kind == "text":
            return max(word, min(self.natural, TEXT_MIN))
        return max([word, *map(len, self.cells)])


def _header_width(header: str, lines: int) -> int:
    """The narrowest width at which ``header``, wrapped between words, takes at most ``lines`` lines."""
    words = header.split()
    for width in range(max(map(len, words)), len(header) + 1):
        used, line = 1, len(words[0])
        for word in words[1:]:
            if line + 1 + len(word) <= width:
                line += 1 + len(word)
            else:
                used, line = used + 1, len(word)
        if used <= lines:
            return width
    return len(header)


def _frame(n: int) -> int:
    """Characters a rich table spends beside its cells: one space of padding each side and a rule per column."""
    return 3 * n + 1


@dataclass
class FittedTable:
    """A table that fits the width it is rendered at (see the module doc); ``print`` it, or ``show`` it."""

    columns: list[Column]
    title: str = ""
    wide: bool = False

    def fit(self, width: int) -> tuple[list[Column], list[int]]:
        """The columns kept at ``width`` and their widths (their sum may pass ``width`` only when even the
        columns that cannot be dropped need more, or when wide)."""
        cols = list(self.columns)
        if not self.wide:
            while sum(c.least for c in cols) + _frame(len(cols)) > width and any(c.drop for c in cols):
                cols.remove(max((c for c in cols if c.drop), key=lambda c: c.drop))
        # Headers on as few lines as fit, the same for every column; descriptions get the room left. A wide
        # table that cannot fit runs on with nothing wrapped.
        widths = [c.natural if self.wide else c.least for c in cols]
        for lines in range(1, max(len(c.header.split()) for c in cols) + 1):
            tried = [c.least if c.kind == "text" else max(c.least, _header_width(c.header, lines)) for c in cols]
            if sum(tried) + _frame(len(cols)) <= width:
                widths = tried
                break
        spare = width - _frame(len(cols)) - sum(widths)
        for i, c in enumerate(cols):
            if c.kind == "text":
                grow = max(0, min(spare, c.natural - widths[i]))
                widths[i] += grow
                spare -= grow
        return cols, widths

    def table(self, width: int) -> Table:
        cols, widths = self.fit(width)
        table = Table(title=self.title or None, width=sum(widths) + _frame(len(cols)))
        for c, w in zip(cols, widths, strict=True):
            cut = c.kind == "text" and not self.wide
            table.add_column(
                c.header, justify=c.justify, style=c.style, width=w, no_wrap=cut, overflow="ellipsis" if cut else "fold"
            )
        for row in zip(*(c.cells for c in cols), strict=True):
            table.add_row(*row)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        cols, widths = self.fit(options.max_width)
        return Measurement(sum(widths) + _frame(len(cols)), sum(widths) + _frame(len(cols)))


def summary_table(
    summaries: Sequence[Summary], title: str = "", wide: bool = False, refused: bool = False
) -> FittedTable:
    """Policies side by side. The refused count is a default column whenever ``refused`` (the run had admission
    control) or any request was refused, and so is the timed-out count when any timed out: a tail that looks
    good because its worst requests were turned away must say so."""
    columns = _with_hits(COLUMNS if wide else DEFAULT_COLUMNS, summaries)
    if not wide:
        shown = {
            "rejected": refused or any(s.rejected for s in summaries),
            "timed_out": any(s.timed_out for s in summaries),
        }
        columns = [*columns, *(c for c in COLUMNS if shown.get(c[1]))]
    return FittedTable(
        [
            Column("policy", [s.policy for s in summaries], "name", "left", style="bold"),
            *(Column(h, [_fmt(value(s, k), f) for s in summaries]) for h, k, f in columns),
        ],
        title,
        wide,
    )


def class_rows(summaries: Sequence[Summary]) -> list[tuple[str, str, str, str, str, str]]:
    """(policy, class, requests, SLO met, TTFT p50, TTFT p99) per SLO class of each run that has several."""
    return [
        (
            s.policy,
            f"{c.ttft_slo:g} s / {c.tpot_slo * 1e3:g} ms",
            str(c.requests),
            _fmt(c.slo_attainment, "pct"),
            _fmt(c.ttft.p50, "{:.3f}"),
            _fmt(c.ttft.p99, "{:.3f}"),
        )
        for s in summaries
        for c in s.classes or []
    ]


CLASS_HEADERS = ("policy", "SLO class (TTFT / TPOT)", "requests", "SLO ok", "TTFT p50 (s)", "TTFT p99 (s)")


def class_table(summaries: Sequence[Summary], wide: bool = False) -> FittedTable | None:
    """Each SLO class's attainment and TTFT, where a run's requests carry several classes (None otherwise):
    pooled, the TTFT tail is the relaxed class's, and a tiered SLO is judged class by class."""
    rows = class_rows(summaries)
    if not rows:
        return None
    kinds = ("name", "value", "value", "value", "value", "value")
    return FittedTable(
        [
            Column(h, [r[i] for r in rows], kind, "left" if i < 2 else "right", style="bold" if i == 0 else None)
            for i, (h, kind) in enumerate(zip(CLASS_HEADERS, kinds, strict=True))
        ],
        "per SLO class",
        wide,
    )


def class_markdown(summaries: Sequence[Summary]) -> str:
    """``class_table`` as markdown ("" where no run has several classes)."""
    rows = class_rows(summaries)
    if not rows:
        return ""
    head = "| " + " | ".join(CLASS_HEADERS) + " |"
    sep = "|---|---|" + "---:|" * (len(CLASS_HEADERS) - 2)
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in rows)])


def show(console: Console, table: FittedTable) -> None:
    """Print ``table`` whole: where even its kept columns need more than the terminal (``--wide``), lines run
    on rather than being cut at the terminal's edge."""
    console.print(table, crop=False)


def show_classes(console: Console, summaries: Sequence[Summary], wide: bool = False) -> None:
    """The per-class table after the summary, where any run has several SLO classes."""
    if (table := class_table(summaries, wide)) is not None:
        show(console, table)


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


def shapes_table(shapes: Sequence[dict], wide: bool = False) -> FittedTable:
    """Traces side by side: size, span, rate and length percentiles (``bundled_shapes`` rows); on a narrow
    terminal the source, the license, then the span (requests / rate) give way."""

    def cells(key: str) -> list[str]:
        return [str(s[key]) for s in shapes]

    def spread(kind: str) -> list[str]:
        return ["/".join(f"{s[f'{kind}_p{q}']:.0f}" for q in (50, 90, 99)) for s in shapes]

    return FittedTable(
        [
            Column("trace", cells("name"), "name", "left"),
            Column("requests", cells("requests")),
            Column("min", [f"{s['duration_s'] / 60:.0f}" for s in shapes], drop=1),
            Column("req/s", [f"{s['qps']:.2f}" for s in shapes]),
            Column("prompt p50/90/99", spread("prompt")),
            Column("output p50/90/99", spread("output")),
            Column("license", cells("license"), justify="left", drop=2),
            Column("source", cells("source"), "text", "left", drop=3),
        ],
        wide=wide,
    )
