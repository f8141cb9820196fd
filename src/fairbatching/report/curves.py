"""Sweep and capacity plots: latency and attainment against load, and where decode slack was spent."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fairbatching.core.request import Request  # noqa: E402
from fairbatching.metrics.summary import Summary  # noqa: E402
from fairbatching.report.plots import TPOT_CLIP, clip_to_slo, save_figure  # noqa: E402

if TYPE_CHECKING:
    from fairbatching.runs import RunResult


def plot_load_curves(results: Sequence[RunResult], path: str | Path, title: str = "") -> Path:
    """P99 TTFT, P99 TPOT and SLO attainment against QPS, one line per policy (mean over seeds)."""
    series: dict[str, dict[float, list[Summary]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        series[r.spec.policy][r.spec.qps].append(r.summary)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("P99 TTFT (s)", lambda s: s.ttft.p99, "log"),
        ("P99 TPOT (ms)", lambda s: s.tpot.p99 * 1e3, "linear"),
        ("SLO attainment", lambda s: s.slo_attainment, "linear"),
    ]
    highest = []
    for ax, (label, get, scale) in zip(axes, panels, strict=True):
        ys = []
        for policy, by_qps in series.items():
            qps = sorted(by_qps)
            ys.append([np.mean([get(s) for s in by_qps[q]]) for q in qps])
            ax.plot(qps, ys[-1], marker="o", ms=3, label=policy)
        highest.append(max((max(y) for y in ys if y), default=0.0))
        ax.set(xlabel="load (req/s)", ylabel=label, yscale=scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if results:
        tpot_ms = max(r.spec.tpot_slo for r in results) * 1e3
        axes[1].axhline(tpot_ms, color="grey", linestyle="--", linewidth=0.8)
        clip_to_slo(axes[1], "y", highest[1], tpot_ms, TPOT_CLIP, "P99 TPOT (ms)", "ms")
    axes[2].axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    return save_figure(fig, path, title)


def plot_slack_timeline(
    runs: dict[str, list[Request]], path: str | Path, title: str = "", sample: int = 4000, seed: int = 0
) -> Path:
    """Decode-token slack against time, per policy: how far each token came ahead of the TPOT line
    anchored at its request's first token (negative = behind). Stall-free batching banks slack that
    nobody uses; FairBatching spends it on prefills and keeps tokens just ahead of their deadlines."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), sharey=True, squeeze=False)
    rng = np.random.default_rng(seed)
    every = [r for reqs in runs.values() for r in reqs]
    ttft = max((r.slo.ttft for r in every), default=1.0)
    last_arrival = max((r.arrival for r in every), default=0.0)
    for ax, (policy, requests) in zip(axes[0], runs.items(), strict=True):
        ts, slack = [], []
        for r in requests:
            times = np.asarray(r.token_times)
            if len(times) > 1:
                due = times[0] + np.arange(1, len(times)) * r.slo.tpot
                ts.append(times[1:])
                slack.append(due - times[1:])
        if ts:
            t, s = np.concatenate(ts), np.concatenate(slack)
            pick = rng.choice(len(t), size=min(sample, len(t)), replace=False)
            ax.scatter(t[pick], s[pick], s=2, alpha=0.3)
            edges = np.linspace(0, max(last_arrival, 1e-9), 81)
            idx = np.digitize(t, edges)
            centers, med = [], []
            for i in range(1, len(edges)):
                sel = s[idx == i]
                if len(sel):
                    centers.append((edges[i - 1] + edges[i]) / 2)
                    med.append(np.median(sel))
            ax.plot(centers, med, color="black", linewidth=1.2, label="median per time bin")
            ax.legend(fontsize=8)
        ax.axhline(0, color="red", linewidth=0.8)
        # Show the arrival window and the SLO-relevant band: after the last arrival, uncontended decodes
        # bank slack without bound, which says nothing about scheduling.
        ax.set(title=policy, xlabel="time (s)", xlim=(0, last_arrival), ylim=(-0.5 * ttft, 2 * ttft))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode slack (s)")
    return save_figure(fig, path, title)


def plot_capacity_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """SLO attainment and P99 TTFT against load for each stack, from the points its capacity search ran."""
    fig, (a_att, a_ttft) = plt.subplots(1, 2, figsize=(13, 4.5))
    for row in rows:
        pts = sorted(row["curve"], key=lambda p: p["qps"])
        qps = [p["qps"] for p in pts]
        a_att.plot(qps, [p["attainment"] for p in pts], marker="o", ms=3, label=row["stack"])
        a_ttft.plot(qps, [p["p99_ttft"] for p in pts], marker="o", ms=3, label=row["stack"])
    a_att.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    a_att.set(xlabel="cluster load (req/s)", ylabel="SLO attainment", xscale="log")
    a_ttft.set(xlabel="cluster load (req/s)", ylabel="P99 TTFT (s, worst seed)", xscale="log", yscale="log")
    for ax in (a_att, a_ttft):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)
