"""A single self-contained HTML file: the summary table, the settings, and the plots inlined."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fairbatching.metrics.summary import Summary
from fairbatching.metrics.table import COLUMNS, _fmt, value

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left;font-weight:bold}img{max-width:100%}
pre{background:#f7f7f7;padding:1em;font-size:12px}
"""


def write_html_report(
    path: str | Path, title: str, summaries: Sequence[Summary], images: Sequence[Path], settings: dict[str, Any]
) -> Path:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(s.policy)}</td>"
        + "".join(f"<td>{_fmt(value(s, k), f)}</td>" for _, k, f in COLUMNS)
        + "</tr>"
        for s in summaries
    )
    imgs = "".join(
        f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<table><tr><th>policy</th>{head}</tr>{rows}</table>{imgs}"
        f"<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=2, default=str))}</pre></body></html>"
    )
    path = Path(path)
    path.write_text(doc)
    return path
