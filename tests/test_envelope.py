import math

import pytest

from fairbatching.core import SLO, Request, is_urgent, slack, token_deadline
from fairbatching.core.envelope import emission_slack
from fairbatching.core.request import decode_anchor
from fairbatching.errors import ConfigError


def test_token_deadlines_follow_the_envelope_line():
    r = Request("a", arrival=10.0, prompt_len=100, slo=SLO(ttft=2.0, tpot=0.05))
    assert token_deadline(r, 1) == pytest.approx(12.0)
    assert token_deadline(r, 2) == pytest.approx(12.05)
    assert token_deadline(r, 11) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        token_deadline(r, 0)


def test_slack_is_time_to_next_deadline_and_negative_when_late():
    r = Request("a", arrival=0.0, prompt_len=100, slo=SLO(ttft=1.0, tpot=0.1))
    assert slack(r, 0.25) == pytest.approx(0.75)
    assert slack(r, 1.5) == pytest.approx(-0.5)


def test_urgent_when_skipping_this_batch_misses_the_deadline():
    r = Request("a", arrival=0.0, prompt_len=100, slo=SLO(ttft=1.0, tpot=0.1))
    # Next token due at t=1.0. With 0.3 s batches, skipping means the token comes at now + 0.6 at best.
    assert not is_urgent(r, now=0.3, batch_time=0.3)
    assert is_urgent(r, now=0.5, batch_time=0.3)
    # Exactly at the cutoff (0.5 + 0.25 + 0.25 = 1.0): the token comes on its deadline, which is on time.
    assert not is_urgent(r, now=0.5, batch_time=0.25)
    assert is_urgent(r, now=0.5, batch_time=0.2, next_batch_time=0.31)


def test_full_carry_keeps_the_papers_envelope():
    r = Request("a", arrival=0.0, prompt_len=10, slo=SLO(ttft=2.0, tpot=0.1), slack_carry=1.0)
    r.num_computed = 10
    r.record_token(0.5)
    assert r.next_deadline == pytest.approx(token_deadline(r, 2))
    r.num_computed = r.num_tokens
    r.record_token(0.6)
    assert r.next_deadline == pytest.approx(token_deadline(r, 3))


def test_zero_carry_runs_decode_deadlines_from_the_first_token():
    r = Request("a", arrival=0.0, prompt_len=10, slo=SLO(ttft=2.0, tpot=0.1), slack_carry=0.0)
    r.record_token(0.5)
    assert r.next_deadline == pytest.approx(0.6)


def test_late_first_token_reanchors_so_the_request_is_not_urgent_forever():
    r = Request("a", arrival=0.0, prompt_len=10, slo=SLO(ttft=1.0, tpot=0.1), slack_carry=1.0)
    r.record_token(3.0)  # two seconds past its TTFT deadline
    assert r.next_deadline == pytest.approx(3.1)
    assert decode_anchor(first_deadline=1.0, first_token_time=3.0, slack_carry=1.0) == 3.0
    assert decode_anchor(first_deadline=5.0, first_token_time=3.0, slack_carry=0.5) == 4.0


def test_emission_slack_reports_lead_per_token():
    r = Request("a", arrival=0.0, prompt_len=10, slo=SLO(ttft=1.0, tpot=0.1))
    r.record_token(0.4)
    r.record_token(1.2)
    assert emission_slack(r) == pytest.approx([0.6, -0.1])


@pytest.mark.parametrize("ttft,tpot", [(0, 0.1), (1, -0.1), (math.inf, 0.1), (1, math.nan)])
def test_impossible_slo_values_are_rejected(ttft, tpot):
    with pytest.raises(ConfigError, match="SLO"):
        SLO(ttft=ttft, tpot=tpot)


def test_count_urgent_is_is_urgent_over_sorted_deadlines_lists_or_arrays():
    import numpy as np

    from fairbatching.core.envelope import count_urgent, urgency_cutoff

    reqs = [Request(f"r{i}", arrival=0.1 * i, prompt_len=10, slo=SLO(ttft=1.0, tpot=0.1)) for i in range(30)]
    deadlines = sorted(r.next_deadline for r in reqs)
    for now, batch, follow in ((0.5, 0.2, None), (1.0, 0.3, 0.05), (0.0, 0.01, 0.01), (5.0, 0.1, 0.1)):
        expected = sum(is_urgent(r, now, batch, follow) for r in reqs)
        assert count_urgent(deadlines, now, batch, follow) == expected
        assert count_urgent(np.array(deadlines), now, batch, follow) == expected
        assert all((d < urgency_cutoff(now, batch, follow)) == (i < expected) for i, d in enumerate(deadlines))
    assert count_urgent([0.5, 1.0, 1.0], 0.5, 0.25) == 1  # a deadline at the cutoff is on time, not urgent


def test_token_deadline_takes_index_arrays():
    import numpy as np

    r = Request("a", arrival=10.0, prompt_len=100, slo=SLO(ttft=2.0, tpot=0.05))
    ks = np.arange(1, 12)
    assert token_deadline(r, ks).tolist() == [token_deadline(r, int(k)) for k in ks]
    with pytest.raises(ValueError):
        token_deadline(r, np.array([1, 0]))
