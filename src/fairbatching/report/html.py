"""Self-contained HTML reports: tables, settings and plots inlined in a single file."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fairbatching.metrics.summary import Summary
from fairbatching.metrics.table import CLASS_HEADERS, COLUMNS, _fmt, class_rows, value

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left;font-weight:bold}img{max-width:100%}
pre{background:#f7f7f7;padding:1em;font-size:12px}
"""


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html_page(
    path: str | Path, title: str, body_html: str, images: Sequence[Path], settings: dict[str, Any] | None = None
) -> Path:
    imgs = "".join(
        f'<h3>{html.escape(p.stem)}</h3><img alt="{html.escape(p.name)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    extra = (
        f"<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=2, default=str))}</pre>" if settings else ""
    )
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body_html}{imgs}{extra}</body></html>"
    )
    path = Path(path)
    path.write_text(doc)
    return path


def class_section(summaries: Sequence[Summary]) -> str:
    """Each SLO class's attainment and TTFT, where a run has several ("" otherwise)."""
    rows = class_rows(summaries)
    return f"<h2>Per SLO class</h2>{html_table(CLASS_HEADERS, rows)}" if rows else ""


def write_html_report(
    path: str | Path, title: str, summaries: Sequence[Summary], images: Sequence[Path], settings: dict[str, Any]
) -> Path:
    rows = [[s.policy, *(_fmt(value(s, k), f) for _, k, f in COLUMNS)] for s in summaries]
    table = html_table(["policy", *(h for h, _, _ in COLUMNS)], rows) + class_section(summaries)
    return write_html_page(path, title, table, images, settings)
