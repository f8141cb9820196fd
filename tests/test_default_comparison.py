"""The headline behaviour on the embedded default workload, as `fairbatching compare` runs it."""

from fairbatching.costmodel import load_profile
from fairbatching.runs import Experiment, WorkloadSpec


def test_fairbatching_meets_the_most_slos_on_the_measured_engine_profile():
    """`fairbatching compare` as shipped (14.8 req/s, the knee of the measured H100 engine profile; README's
    first table): FairBatching holds the most requests to both SLOs and the most to TPOT, with the lowest
    P99 TTFT."""
    exp = Experiment(WorkloadSpec().build(), load_profile())
    s = {name: exp.run(name).summary for name in ("fairbatching", "sarathi", "vllm")}
    assert all(x.tpot_attainment >= 0.95 and x.ttft_attainment >= 0.9 for x in s.values())
    assert s["fairbatching"].tpot_attainment > max(s["sarathi"].tpot_attainment, s["vllm"].tpot_attainment)
    assert s["fairbatching"].slo_attainment > max(s["sarathi"].slo_attainment, s["vllm"].slo_attainment)
    assert s["fairbatching"].ttft.p99 < min(s["sarathi"].ttft.p99, s["vllm"].ttft.p99)


def test_fairbatching_has_the_lowest_p99_ttft_on_the_analytic_profile():
    """The roofline profile (a faster GPU than our engine) at 17.5 req/s: lowest P99 TTFT, most SLOs met."""
    exp = Experiment(WorkloadSpec(qps=17.5).build(), load_profile("llama-3-8b-h100-analytic"))
    s = {name: exp.run(name).summary for name in ("fairbatching", "sarathi", "vllm")}
    assert all(x.tpot_attainment >= 0.9 for x in s.values())
    assert s["fairbatching"].ttft.p99 < s["sarathi"].ttft.p99 < s["vllm"].ttft.p99
    assert s["fairbatching"].slo_attainment > max(s["sarathi"].slo_attainment, s["vllm"].slo_attainment)
