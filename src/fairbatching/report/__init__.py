"""Human-facing output: plots (PNG) and a self-contained HTML report."""

from fairbatching.report.html import write_html_report
from fairbatching.report.plots import plot_comparison

__all__ = ["plot_comparison", "write_html_report"]
