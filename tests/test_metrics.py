import json
import math

import pytest

from fairbatching.core import SLO, Request
from fairbatching.core.request import RequestStatus
from fairbatching.metrics import request_metrics, summarize
from fairbatching.metrics.summary import Summary


def finished(rid, arrival, times, ttft=1.0, tpot=0.1):
    r = Request(rid, arrival, 10, SLO(ttft, tpot))
    r.first_scheduled = arrival + 0.05
    for t in times:
        r.record_token(t)
    r.status = RequestStatus.FINISHED
    return r


def test_request_metrics():
    m = request_metrics(finished("a", 0.0, [0.5, 0.55, 0.75, 0.8]))
    assert m.ttft == pytest.approx(0.5)
    assert m.tpot == pytest.approx(0.1)
    assert m.max_tbt == pytest.approx(0.2)
    assert m.e2e == pytest.approx(0.8) and m.queue_delay == pytest.approx(0.05)
    assert m.ttft_met and m.tpot_met and m.envelope_met


def test_mean_tpot_and_envelope_disagree_in_both_directions():
    late_middle = request_metrics(finished("a", 0.0, [1.0, 1.2, 1.3], ttft=1.0, tpot=0.15))
    assert late_middle.tpot_met and not late_middle.envelope_met  # token 2 was due at 1.15
    early_then_slow = request_metrics(finished("b", 0.0, [0.2, 0.6, 0.9], ttft=1.0, tpot=0.15))
    assert early_then_slow.envelope_met and not early_then_slow.tpot_met  # mean gap 0.35 s


def test_summary_counts_failures_as_misses():
    ok = finished("ok", 0.0, [0.2, 0.3])
    slow = finished("slow", 0.0, [3.0, 3.1])
    rejected = Request("rej", 0.0, 10, SLO(1.0, 0.1))
    rejected.status, rejected.finish_reason = RequestStatus.REJECTED, "too long"
    s = summarize("p", "w", [ok, slow, rejected], end_time=4.0, busy_time=2.0, preemptions=3)
    assert (s.requests, s.finished, s.rejected) == (3, 2, 1)
    assert s.ttft_attainment == pytest.approx(1 / 3)
    assert s.slo_attainment == pytest.approx(1 / 3)
    assert s.goodput_rps == pytest.approx(1 / 4.0)
    assert s.gpu_busy == pytest.approx(0.5) and s.preemptions == 3
    assert s.ttft.max == pytest.approx(3.0) and not math.isnan(s.tbt.p99)
    assert request_metrics(rejected).ttft != request_metrics(rejected).ttft  # NaN for never-served


def test_a_request_lost_after_its_first_token_counts_as_failed_and_not_in_the_served_ttft():
    ok = finished("ok", 0.0, [0.2, 0.3])
    lost = Request("lost", 0.0, 10, SLO(1.0, 0.1))
    lost.record_token(5.0)
    lost.status, lost.finish_reason = RequestStatus.FAILED, "node 0 failed at 5.100 s"
    s = summarize("p", "w", [ok, lost], end_time=6.0, busy_time=1.0, preemptions=0)
    assert (s.requests, s.finished, s.rejected, s.timed_out, s.failed) == (2, 1, 0, 0, 1)
    assert s.ttft.max == pytest.approx(0.2)
    assert s.to_dict()["failed"] == 1
    assert "failed" not in summarize("p", "w", [ok], 1.0, 0.5, 0).to_dict()  # absent where none failed


def test_summary_files(tmp_path):
    s = summarize("p", "w", [finished("a", 0.0, [0.2, 0.3])], 1.0, 0.5, 0)
    s.write_json(tmp_path / "s.json")
    s.write_requests_csv(tmp_path / "r.csv")
    assert '"slo_attainment": 1.0' in (tmp_path / "s.json").read_text()
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("request_id,status")


def test_each_slo_class_has_its_own_attainment_and_tail_and_one_class_has_none():
    tight = [finished(f"t{i}", 0.0, [0.3, 0.35], ttft=0.5, tpot=0.05) for i in range(3)]
    tight.append(finished("t-late", 0.0, [2.0, 2.05], ttft=0.5, tpot=0.05))
    relaxed = [finished(f"r{i}", 0.0, [4.0, 4.1], ttft=8.0, tpot=0.2) for i in range(4)]
    s = summarize("p", "w", tight + relaxed, end_time=5.0, busy_time=1.0, preemptions=0)
    assert [(c.ttft_slo, c.requests) for c in s.classes] == [(0.5, 4), (8.0, 4)]
    assert s.classes[0].slo_attainment == pytest.approx(0.75) and s.classes[1].slo_attainment == 1.0
    assert s.classes[0].ttft.max == pytest.approx(2.0) and s.classes[1].ttft.p99 == pytest.approx(4.0)
    assert s.ttft.p99 > 3.9  # pooled, the relaxed class's TTFT is the tail
    assert Summary.from_dict(json.loads(json.dumps(s.to_dict()))).classes == s.classes
    one = summarize("p", "w", tight, end_time=5.0, busy_time=1.0, preemptions=0)
    assert one.classes is None and "classes" not in one.to_dict()
