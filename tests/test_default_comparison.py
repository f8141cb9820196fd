"""The headline behaviour on the embedded default workload, as `fairbatching compare` runs it."""

from fairbatching.costmodel import load_profile
from fairbatching.experiment import Experiment, WorkloadSpec


def test_fairbatching_has_the_lowest_p99_ttft_while_everyone_holds_tpot():
    exp = Experiment(WorkloadSpec().build(), load_profile())
    s = {name: exp.run(name).summary for name in ("fairbatching", "sarathi", "vllm")}
    assert all(x.tpot_attainment >= 0.9 for x in s.values())
    assert s["fairbatching"].ttft["p99"] < s["sarathi"].ttft["p99"] < s["vllm"].ttft["p99"]
    assert s["fairbatching"].slo_attainment > max(s["sarathi"].slo_attainment, s["vllm"].slo_attainment)
