"""Comparison plots: TTFT and TPOT CDFs, and latency and queue length over time, one line per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fairbatching.metrics.summary import Summary  # noqa: E402
from fairbatching.serving.node import IterationLog  # noqa: E402


def _cdf(ax, values: np.ndarray, label: str, scale: float = 1.0) -> None:
    v = np.sort(values[~np.isnan(values)]) * scale
    if len(v):
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)


# Axes stop at a few times the SLO: past that every request has missed, and a long tail stretched across the
# axis squeezes the range below the SLO where the policies differ.
TTFT_CLIP = 5.0
TPOT_CLIP = 2.0


def clip_to_slo(ax, axis: str, largest: float, slo: float, factor: float, label: str, unit: str) -> None:
    """Label ``axis`` ("x" or "y"); if the data reach past ``factor`` x ``slo``, cut it there and say so."""
    limit = factor * slo
    if largest > limit:
        if axis == "x":
            ax.set_xlim(right=limit)
        else:
            ax.set_ylim(top=limit)
        label = f"{label}; axis cut at {factor:g}x SLO ({limit:g} {unit})"
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def _largest(arrays: Sequence[np.ndarray]) -> float:
    v = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.array([])
    v = v[~np.isnan(v)]
    return float(v.max()) if len(v) else 0.0


def _rolling_p99(t: np.ndarray, v: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(t)
    t, v = t[order], v[order]
    edges = np.arange(t.min(), t.max() + window, window) if len(t) else np.array([])
    centers, p99 = [], []
    for lo in edges:
        sel = v[(t >= lo) & (t < lo + window)]
        if len(sel):
            centers.append(lo + window / 2)
            p99.append(np.percentile(sel, 99))
    return np.array(centers), np.array(p99)


def plot_comparison(
    summaries: Sequence[Summary], logs: Sequence[IterationLog], path: str | Path, title: str = ""
) -> Path:
    """Four panels: TTFT CDF, TPOT CDF (with SLO lines), rolling P99 TTFT by arrival time, queue length."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (a_ttft, a_tpot), (a_time, a_queue) = axes
    duration = max(s.duration_s for s in summaries)
    window = max(duration / 60, 1.0)
    seen: dict[str, list[np.ndarray]] = {"ttft": [], "tpot": [], "p99": []}
    for s, log in zip(summaries, logs, strict=True):
        ttft = np.array([m.ttft if m.served else np.nan for m in s.per_request])  # as the summary's
        tpot = np.array([m.tpot for m in s.per_request])
        _cdf(a_ttft, ttft, s.policy)
        _cdf(a_tpot, tpot, s.policy, scale=1e3)
        arrivals = np.array([m.arrival for m in s.per_request])
        ok = ~np.isnan(ttft)
        x, y = _rolling_p99(arrivals[ok], ttft[ok], window)
        a_time.plot(x, y, label=s.policy)
        seen["ttft"].append(ttft)
        seen["tpot"].append(tpot * 1e3)
        seen["p99"].append(y)
        if log.start:
            a_queue.plot(log.start, log.waiting, label=s.policy, linewidth=0.8)
    a_ttft.set(ylabel="fraction of requests", title="TTFT CDF", xscale="log")
    a_tpot.set(ylabel="fraction of requests", title="TPOT CDF")
    a_time.set(xlabel="arrival time (s)", title=f"P99 TTFT over time ({window:.0f} s windows)")
    every = [m for s in summaries for m in s.per_request]
    if every:
        ttft_slo = max(m.ttft_slo for m in every)
        tpot_ms = max(m.tpot_slo for m in every) * 1e3
        a_ttft.axvline(ttft_slo, color="grey", linestyle="--", linewidth=0.8, label="TTFT SLO")
        a_tpot.axvline(tpot_ms, color="grey", linestyle="--", linewidth=0.8, label="TPOT SLO")
        clip_to_slo(a_ttft, "x", _largest(seen["ttft"]), ttft_slo, TTFT_CLIP, "TTFT (s)", "s")
        clip_to_slo(a_tpot, "x", _largest(seen["tpot"]), tpot_ms, TPOT_CLIP, "TPOT (ms)", "ms")
        clip_to_slo(a_time, "y", _largest(seen["p99"]), ttft_slo, TTFT_CLIP, "P99 TTFT (s)", "s")
    a_queue.set(xlabel="time (s)", ylabel="waiting requests", title="queue length")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    """Title, lay out, write as PNG and release a figure (pyplot keeps every open figure alive)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
