"""Bad engine options on the command line: one line naming the flag, exit 2, before any engine is built."""

from __future__ import annotations

import pytest
from conftest import assert_refused_before_work

from fairbatching.errors import ConfigError

CPU = ["--device", "cpu", "--model", "tiny"]
GPU_COMPARE = ["compare", "-n", "4", "--backend", "gpu", *CPU, "--out", "{tmp}/p"]


@pytest.mark.parametrize(
    "args,message",
    [
        ([*GPU_COMPARE, "--num-blocks", "0"], "--num-blocks 0: must be >= 2"),
        ([*GPU_COMPARE, "--num-blocks", "-3"], "--num-blocks -3: must be >= 2"),
        ([*GPU_COMPARE, "--num-blocks", "400", "--block-size", "0"], "--block-size 0: must be >= 1"),
        ([*GPU_COMPARE, "--num-blocks", "400", "--max-context", "0"], "--max-context 0: must be >= 2"),
        (["replay", *CPU, "--num-blocks", "400", "--block-size", "-1", "-n", "2"], "--block-size -1: must be >= 1"),
        (["replay", *CPU, "--num-blocks", "400", "--max-context", "1", "-n", "2"], "--max-context 1: must be >= 2"),
        (["profile", "--out", "{tmp}/p", *CPU, "--num-blocks", "1"], "--num-blocks 1: must be >= 2"),
        (["profile", "--out", "{tmp}/p", *CPU, "--num-blocks", "50", "--repeats", "0"], "'--repeats': must be >= 1"),
        (
            ["compare", "-n", "4", "--num-blocks", "-1", "--out", "{tmp}/p"],
            "--num-blocks -1: applies only to --backend gpu",
        ),
        (
            ["compare", "-n", "4", "--block-size", "-5", "--out", "{tmp}/p"],
            "--block-size -5: applies only to --backend gpu",
        ),
        (["capacity", "-n", "4", "--max-context", "0", "--out", "{tmp}/p"], "--max-context 0: applies only to"),
        (["capacity", "-n", "4", "--gpus", "3", "--out", "{tmp}/p"], "--gpus 3: applies only to"),
        (["cluster", "-n", "4", "--device", "bogus", "--out", "{tmp}/p"], "--device bogus: applies only to"),
        (["cluster", "-n", "4", "--nodes", "2", "--gpus", "2", "--out", "{tmp}/p"], "--gpus 2: applies only to"),
        (["evaluate", "-n", "4", "--model", "tiny", "--out", "{tmp}/p"], "--model tiny: applies only to"),
    ],
)
def test_bad_or_ignored_engine_options_exit_2_before_any_work(tmp_path, args, message):
    assert_refused_before_work(tmp_path, args, message)


def test_the_engine_refuses_bad_sizes_before_building_its_model():
    from fairbatching.engine import build_engine

    with pytest.raises(ConfigError, match="--block-size 0"):
        build_engine("tiny", device="cpu", num_blocks=400, block_size=0)
