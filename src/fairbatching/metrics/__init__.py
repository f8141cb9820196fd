"""Latency and SLO metrics, per request and aggregated, for every backend's results."""

from fairbatching.metrics.summary import RequestMetrics, Summary, request_metrics, summarize

__all__ = ["RequestMetrics", "Summary", "request_metrics", "summarize"]
