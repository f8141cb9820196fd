from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fairbatching.core import SLO, BlockAllocator, KVCacheConfig, Request
from fairbatching.costmodel import CostModel, CostParams
from fairbatching.policies import SchedulerState

# Modules that start vLLM, Ray Serve, PyTorch models, a mypyc build or fresh-venv installs: most of the suite's
# time, so `pytest -m "not slow"` leaves them out for a quick check (README, "Two commands").
SLOW_MODULES = {
    "test_compiled",
    "test_extras",
    "test_engine",
    "test_engine_cluster",
    "test_prefix_cache_gpu",
    "test_ray_serve",
    "test_vllm_scheduler",
    "test_vllm_serve",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


# A simple additive cost model: 5 ms per iteration + 20 us per new token + 20 ns per context token.
SIMPLE = CostParams(t_fixed=0.0, c_seq=0.0, t_weights=0.005, c_kv=2e-8, c_tok=2e-5, c_attn=0.0, p=1.0)


@pytest.fixture
def cost() -> CostModel:
    return CostModel(SIMPLE)


def decode(rid: str, now: float, slack: float, prompt: int = 512, generated: int = 5, tpot: float = 0.1) -> Request:
    """A running decode whose next token is due ``slack`` seconds from ``now``."""
    r = Request(rid, arrival=now - 10.0, prompt_len=prompt, slo=SLO(ttft=2.0, tpot=tpot), slack_carry=0.0)
    r.num_computed = prompt
    for i in range(generated):
        r.record_token(now - 5.0 + i * 0.01)
    r.num_computed = r.num_tokens - 1
    r.next_deadline = now + slack
    r.num_blocks = -(-r.num_tokens // 16) + 1
    from fairbatching.core.request import RequestStatus

    r.status = RequestStatus.RUNNING
    return r


def waiting(rid: str, now: float, age: float, prompt: int = 1024, ttft: float = 2.0) -> Request:
    """A new request that arrived ``age`` seconds ago."""
    return Request(rid, arrival=now - age, prompt_len=prompt, slo=SLO(ttft=ttft, tpot=0.1))


def state(now: float, running: list[Request], queue: list[Request], blocks: int = 100_000) -> SchedulerState:
    kv = BlockAllocator(KVCacheConfig(num_blocks=blocks, block_size=16))
    kv.free_blocks -= sum(r.num_blocks for r in running)
    return SchedulerState(now, running, queue, kv)


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn`` of a command a test interrupts: SIGINT at its default, so the command hears a Ctrl-C even
    where the tests run with SIGINT ignored (a background job of a non-interactive shell passes that on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_refused_before_work(tmp_path: Path, args: list[str], message: str) -> None:
    """``fairbatching ARGS`` (``{tmp}`` standing for ``tmp_path``) exits 2 with one line saying ``message``, and
    leaves no ``{tmp}/p`` behind: refused before anything was built or written."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = subprocess.run([sys.executable, "-m", "fairbatching", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "p").exists()
