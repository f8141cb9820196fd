"""Scheduling overhead inside vLLM: our ``schedule()`` against vLLM's stock ``Scheduler.schedule()`` on the
same states (N running requests decoding, a few prompts arriving), N = 64 / 256 / 1024. CPU only.

    python benchmarks/bench_vllm_scheduler.py [--steps 200] [--out results/benchmarks/vllm_scheduler.json]

Prints mean and p99 microseconds per schedule() call and the ratio to the stock scheduler measured in the
same run (goal: <= 1.2x), and how much of our call is our own work (views, policy, steering) rather than
vLLM's schedule() underneath, which is the steadier number on a noisy machine. update_from_output() is
timed too (our views and online calibration live there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_vllm_scheduler import make_requests, make_scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402


class _Env:
    """monkeypatch stand-in for make_scheduler outside pytest."""

    def setenv(self, key: str, value: str) -> None:
        import os

        os.environ[key] = value


def measure(model_dir: str, scheduler_cls: str | None, n: int, steps: int) -> dict:
    from vllm.v1.core.sched.scheduler import Scheduler

    inner: list[float] = []  # vLLM's own schedule() inside ours: the rest of our call is what we add
    stock_schedule = Scheduler.schedule

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return stock_schedule(self, *args, **kwargs)
        finally:
            inner.append(time.perf_counter() - start)

    sched = make_scheduler(
        model_dir,
        _Env(),
        max_num_seqs=n,
        max_num_batched_tokens=8192,
        num_blocks=n * 80 + 64,
        max_model_len=4096,
        scheduler_cls=scheduler_cls,
    )
    for r in make_requests(n, prompt_len=512, max_tokens=100_000, extra_args={"ttft_slo": 2.0, "tpot_slo": 0.1}):
        sched.add_request(r)
    extra = iter(make_requests(steps, prompt_len=256, max_tokens=4, start=10 * n))
    sched_times, update_times, added = [], [], []
    Scheduler.schedule = timed
    try:
        _steps(sched, extra, steps, sched_times, update_times, added, inner)
    finally:
        Scheduler.schedule = stock_schedule
    q = statistics.quantiles
    return {
        "schedule_us": 1e6 * statistics.mean(sched_times),
        "schedule_p99_us": 1e6 * q(sched_times, n=100)[98],
        "added_us": 1e6 * statistics.mean(added),
        "update_us": 1e6 * statistics.mean(update_times),
        "running": len(sched.running),
    }


def _steps(sched, extra, steps, sched_times, update_times, added, inner) -> None:
    for i in range(steps + 200):
        if i >= 200 and i % 8 == 0:  # steady state: a prompt arrives every 8 steps, as under load
            sched.add_request(next(extra))
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        ids = list(out.num_scheduled_tokens)
        sampled = [[5] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens else [] for r in ids]
        mro = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)}, sampled_token_ids=sampled
        )
        t2 = time.perf_counter()
        sched.update_from_output(out, mro)
        t3 = time.perf_counter()
        if i >= 200:
            sched_times.append(t1 - t0)
            update_times.append(t3 - t2)
            added.append(t1 - t0 - inner[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per scheduler; the best mean counts")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model_dir = tempfile.mkdtemp()
    (Path(model_dir) / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 128256,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "max_position_embeddings": 8192,
                "torch_dtype": "bfloat16",
            }
        )
    )
    rows = []
    for n in (64, 256, 1024):
        runs: dict[str, list[dict]] = {"stock": [], "ours": []}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
            runs["stock"].append(measure(model_dir, None, n, args.steps))
            runs["ours"].append(
                measure(model_dir, "fairbatching.integrations.vllm.FairBatchingScheduler", n, args.steps)
            )
        stock = min(runs["stock"], key=lambda r: r["schedule_us"])
        ours = min(runs["ours"], key=lambda r: r["schedule_us"])
        row = {"running": n, "stock": stock, "fairbatching": ours, "ratio": ours["schedule_us"] / stock["schedule_us"]}
        rows.append(row)
        print(
            f"N={n:5d}  stock schedule {stock['schedule_us']:8.1f} us (p99 {stock['schedule_p99_us']:8.1f})  "
            f"fairbatching {ours['schedule_us']:8.1f} us (p99 {ours['schedule_p99_us']:8.1f})  "
            f"ratio {row['ratio']:.2f}x, of which ours {ours['added_us']:.0f} us = "
            f"{ours['added_us'] / stock['schedule_us'] * 100:.0f}% of stock  "
            f"| update_from_output {stock['update_us']:.0f} vs {ours['update_us']:.0f} us",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
