"""Prefix caching: the block manager's invariants, the simulator's use of it, and the routers that weigh it."""

import random

import pytest

from fairbatching.cluster import ClusterConfig, NodeReport, make_router, simulate_cluster
from fairbatching.cluster.simulator import homogeneous
from fairbatching.core.kv import KVCacheConfig, PrefixCachingAllocator, segment_block_hashes, token_block_hashes
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.profile import load_profile
from fairbatching.policies import POLICIES, make_policy
from fairbatching.runs import Experiment, RunSpec
from fairbatching.serving.node import Node, NodeConfig
from fairbatching.workloads.spec import RequestSpec, Workload

SLO_ = SLO(2.0, 0.1)


def check_invariants(kv: PrefixCachingAllocator, live: list[Request]) -> None:
    """Every block is exactly one of: unused, cached and unreferenced (LRU), or held; a held block's reference
    count is the number of live tables naming it; the free count is unused plus evictable."""
    held: dict[int, int] = {}
    for r in live:
        table = kv.table(r.request_id)
        assert len(table) == r.num_blocks, r
        for b in table:
            held[b] = held.get(b, 0) + 1
    unused, lru = set(kv.unused), set(kv.lru)
    assert len(unused) == len(kv.unused) and not unused & lru
    assert not (unused | lru) & set(held), "a block is free while a request holds it"
    assert len(unused) + len(lru) + len(held) == kv.num_blocks, "a block went missing or is counted twice"
    for b in range(kv.num_blocks):
        assert kv.ref[b] == held.get(b, 0), b
    assert kv.free_blocks == len(unused) + len(lru)
    for h, b in kv.cached.items():
        assert kv.block_hash[b] == h
    assert all(kv.block_hash[b] is not None for b in lru)


def request(rid: str, prompt: int, hashes: tuple[int, ...]) -> Request:
    return Request(rid, 0.0, prompt, SLO_, block_hashes=hashes)


def test_hit_is_the_cached_prefix_in_whole_blocks_and_leaves_a_token_to_compute():
    kv = PrefixCachingAllocator(KVCacheConfig(num_blocks=16, block_size=4))
    hashes = token_block_hashes(list(range(12)), 4)
    a = request("a", 12, hashes)
    kv.lookup(a)
    assert a.num_computed == 0
    kv.admit(a)
    kv.allocate(a, 12)
    a.num_computed = 12
    kv.commit(a)
    assert len(kv.cached) == 3
    b = request("b", 12, hashes)  # the same 12 tokens: all 3 blocks cached, yet the last token is computed
    kv.lookup(b)
    assert b.num_computed == 8 and b.remaining == 4
    c = request("c", 10, hashes[:2] + (12345,))
    kv.lookup(c)
    assert c.num_computed == 8
    kv.admit(b)
    assert kv.table("b") == kv.table("a")[:2] and kv.ref[kv.table("a")[0]] == 2 and b.prefix_hit == 8
    check_invariants(kv, [a, b])
    kv.free(a)
    check_invariants(kv, [b])
    assert kv.ref[kv.table("b")[0]] == 1  # still held by b: not free
    kv.free(b)
    check_invariants(kv, [])
    assert kv.free_blocks == 16 and len(kv.lru) == 3  # cached, unreferenced, evictable


def test_eviction_takes_the_least_recently_freed_tail_first_and_a_lost_block_shortens_the_hit():
    kv = PrefixCachingAllocator(KVCacheConfig(num_blocks=4, block_size=2))
    hashes = segment_block_hashes(((7, 8),), 8, 2)
    a = request("a", 8, hashes)
    kv.allocate(a, 8)
    a.num_computed = 8
    kv.commit(a)
    kv.free(a)  # blocks 0..3 cached; freed last block first, so the tail is evicted first
    b = request("b", 8, hashes)
    kv.lookup(b)
    assert b.num_computed == 6  # 3 blocks: the 4th would leave nothing to compute
    other = request("x", 2, ())
    kv.allocate(other, 2)  # takes one evictable block: the tail (block 3), not part of b's hit
    kv.admit(b)
    assert b.num_computed == 6 and b.num_blocks == 3
    kv.free(other)
    kv.free(b)
    c = request("c", 8, hashes)
    kv.lookup(c)
    y = request("y", 4, ())
    kv.allocate(y, 4)  # two more evictions: now the hit loses blocks
    kv.admit(c)
    assert c.num_computed < 6 and c.num_blocks == c.num_computed // 2
    check_invariants(kv, [y, c])


def test_no_double_counting_when_a_shared_block_holder_is_preempted():
    kv = PrefixCachingAllocator(KVCacheConfig(num_blocks=8, block_size=2))
    hashes = segment_block_hashes(((1, 6),), 6, 2)
    a, b = request("a", 6, hashes), request("b", 6, hashes)
    kv.allocate(a, 6)
    a.num_computed = 6
    kv.commit(a)
    kv.lookup(b)
    kv.admit(b)  # b shares a's first two blocks
    w = request("w", 6, hashes)
    kv.lookup(w)
    # Two holders: preempting either frees neither shared block, and w is not charged for them.
    assert kv.blocks_freed_by(a) == 1 and kv.blocks_freed_by(b) == 0
    assert kv.extra_blocks(w, 2) == 1


def prefix_workload(n: int, qps: float, seed: int = 0, prompt: int = 1200) -> Workload:
    """Requests over a few shared system prompts, each with a private tail."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        system = rng.randrange(4)
        tail = rng.randrange(16, 600)
        reqs.append(
            RequestSpec(
                f"r{i}", i / qps, prompt + tail, rng.randrange(4, 120), prefix=((system, prompt), (100 + i, 10**6))
            )
        )
    return Workload("prefix-test", tuple(reqs))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_memory_pressure_loses_no_request_and_keeps_every_invariant(policy):
    prof = load_profile()
    cost = prof.cost_model()
    config = NodeConfig(SLO_, KVCacheConfig(num_blocks=400, block_size=16), prefix_caching=True, fast_forward=True)
    node = Node(make_policy(policy, cost, tpot_slo=SLO_.tpot), cost, config)
    w = prefix_workload(60, qps=20.0)
    specs = list(w.requests)
    for s in specs:
        node.advance_to(s.arrival)
        node.submit(node.new_request(s.request_id, s.arrival, s.prompt_len, s.slo, s.block_hashes(16)), s.output_len)
        check_invariants(node.kv, node.running)
    while node.has_work:
        if not node.step(horizon=float("inf")):
            break
        check_invariants(node.kv, node.running)
    assert not node.has_work
    assert sorted(r.request_id for r in node.done) == sorted(s.request_id for s in specs)
    assert all(r.status is RequestStatus.FINISHED for r in node.done)
    outputs = {s.request_id: s.output_len for s in specs}
    assert all(len(r.token_times) == outputs[r.request_id] for r in node.done)
    assert sum(r.prefix_hit for r in node.done) > 0
    check_invariants(node.kv, [])
    assert node.kv.free_blocks == node.kv.num_blocks


def test_caching_cuts_prefill_and_reports_a_hit_rate():
    w = prefix_workload(200, qps=6.0)
    off = Experiment(w, load_profile()).run("fairbatching").summary
    on = Experiment(w, load_profile(), prefix_caching=True).run("fairbatching").summary
    assert off.prefix_hit_rate is None and "prefix_hit_rate" not in off.to_dict()
    assert 0.5 < on.prefix_hit_rate < 1.0  # the shared 1200 tokens of all but the first few of each prompt
    assert on.ttft.p99 < off.ttft.p99 and on.gpu_busy < off.gpu_busy


def test_a_spec_without_caching_keeps_its_key():
    spec = RunSpec("fairbatching", "default", 10.0)
    assert "prefix_caching" not in spec.as_dict()
    assert RunSpec("fairbatching", "default", 10.0, prefix_caching=True).key() != spec.key()


def report(node: int, outstanding: int = 0, tokens: int = 10**6, t: float = 0.0) -> NodeReport:
    from fairbatching.policies.admission import AdmissionBudget

    return NodeReport(node, t, outstanding, 0, 0, AdmissionBudget(1.0, tokens, 0.0, 0.0, 8, 1.0))


def test_prefix_affinity_follows_the_prefix_within_the_imbalance_bound():
    router = make_router("prefix-affinity")
    blocks = tuple(range(100))
    reports = [report(0), report(1)]
    first = router.choose(1600, reports, blocks=blocks)
    router.note_dispatch(first, 1600, blocks)
    busy = [report(0, outstanding=5 if first == 0 else 0), report(1, outstanding=5 if first == 1 else 0)]
    assert router.choose(1600, busy, blocks=blocks) == first  # 5 more requests there: within the bound of 10
    swamped = [report(0, outstanding=50 if first == 0 else 0), report(1, outstanding=50 if first == 1 else 0)]
    assert router.choose(1600, swamped, blocks=blocks) == 1 - first  # imbalanced: least loaded instead
    assert router.choose(1600, busy, blocks=tuple(range(1000, 1100))) == 1 - first  # no match: least loaded


def test_pab_affinity_prices_a_node_by_its_uncached_prefill():
    router = make_router("pab-affinity", admission=True, block_size=16)
    blocks = tuple(range(100))  # 1600 tokens
    assert router.choose(1600, [report(0)], blocks=blocks) == 0
    router.note_dispatch(0, 1600, blocks)
    # A later report: node 0 has 1000 tokens of budget left and the prefix; node 1 has 1500 and nothing cached.
    reports = [report(0, tokens=1000, t=1.0), report(1, tokens=1500, t=1.0)]
    assert router.choose(1700, reports, blocks=blocks + (555,)) == 0  # needs 100 there, 1700 on node 1
    assert make_router("pab", admission=True).choose(1700, reports) is None  # plain PAB: fits nowhere


def queued(node: int, t: float, seconds: float) -> NodeReport:
    """A report whose node has ``seconds`` of prefill due within 0.5 s: 1e-4 s a prompt token, a 2 s horizon."""
    from fairbatching.policies.admission import AdmissionBudget

    left = max(0.0, 2.0 - seconds)
    due = ((0.5, seconds),) if seconds else ()
    budget = AdmissionBudget(left, int(left / 1e-4), 0.0, seconds, 8, 2.0, 1e-4, 10**6, queued_due=due)
    return NodeReport(node, t, 0, 0, 0, budget)


def test_pab_affinity_keeps_a_conversation_home_until_home_cannot_meet_its_ttft():
    router = make_router("pab-affinity", block_size=16)
    history = tuple(range(100))  # turn 1: 1600 tokens
    assert router.choose(1600, [queued(0, 0.0, 0.0), queued(1, 0.0, 0.0)], 2.0, history) == 0
    router.note_dispatch(0, 1600, history)
    turn = history + (500,)  # turn 2: 1700 tokens, 1600 of them cached on node 0
    # Node 0 is busier (5000 tokens of budget left against 20000) but still fits the 100 it must prefill: stay.
    assert router.choose(1700, [queued(0, 1.0, 1.5), queued(1, 1.0, 0.0)], 2.0, turn) == 0
    router.note_dispatch(0, 1700, turn)
    turn += (501,)
    # Node 0 has 1.995 s of prefill due first: 50 tokens within a 2 s TTFT, under the 100 it needs. Move.
    swamped = [queued(0, 2.0, 1.995), queued(1, 2.0, 0.0)]
    assert router.choose(1716, swamped, 2.0, turn) == 1
    assert router.choose(1716, swamped, 10.0, turn) == 0  # a 10 s TTFT: home still makes it
    # Neither fits (node 1 would prefill all 1716 tokens): home, where it costs least; refused under admission.
    both = [queued(0, 3.0, 1.995), queued(1, 3.0, 1.9)]
    assert router.choose(1716, both, 2.0, turn) == 0
    strict = make_router("pab-affinity", admission=True, block_size=16)
    strict.note_dispatch(strict.choose(1600, [queued(0, 0.0, 0.0), queued(1, 0.0, 0.1)], 2.0, history), 1600, history)
    assert strict.choose(1716, both, 2.0, turn) is None


def test_pab_affinity_sees_no_home_in_a_prefix_every_node_holds():
    router = make_router("pab-affinity", block_size=16)
    system = tuple(range(-50, 0))  # an 800-token system prompt, sent to both nodes
    for node in (0, 1):
        router.choose(900, [queued(0, 0.0, 0.0), queued(1, 0.0, 0.0)], 2.0, system + (node,))
        router.note_dispatch(node, 900, system + (node,))
    # A new conversation on that system prompt goes by budget, not to whichever node was sent it first.
    assert router.choose(900, [queued(0, 1.0, 1.5), queued(1, 1.0, 0.0)], 2.0, system + (7,)) == 1


def test_cluster_with_caching_accounts_for_every_request():
    w = prefix_workload(120, qps=30.0)
    for router in ("pab-affinity", "prefix-affinity", "round-robin"):
        cfg = ClusterConfig(homogeneous(2, "fairbatching"), SLO_, router=router, prefix_caching=True)
        res = simulate_cluster(w, cfg)
        assert sorted(r.request_id for r in res.requests) == sorted(s.request_id for s in w.requests)
        assert sum(r.prefix_hit for r in res.requests) > 0


@pytest.mark.parametrize("caching", [False, True])
def test_admission_prices_only_the_uncached_prompt(caching):
    prof = load_profile()
    cost = prof.cost_model()
    config = NodeConfig(SLO(0.2, 0.1), prof.kv, admission="reject", prefix_caching=caching)
    node = Node(make_policy("fairbatching", cost, tpot_slo=0.1), cost, config)
    budget = node.policy.admission_budget(node.state, 0.2).tokens_within(0.2)
    shared = budget // 2 // 16 * 16
    first = RequestSpec("a", 0.0, shared + 16, 2, prefix=((1, shared), (2, 16)))
    node.submit(node.new_request("a", 0.0, first.prompt_len, None, first.block_hashes(16)), 2)
    node.drain()
    # Longer than the whole budget, but all of it past the shared part fits.
    long = RequestSpec("b", node.clock, shared + budget - 64, 2, prefix=((1, shared), (3, 10**6)))
    node.submit(node.new_request("b", node.clock, long.prompt_len, None, long.block_hashes(16)), 2)
    node.drain()
    b = next(r for r in node.done if r.request_id == "b")
    assert (b.status is RequestStatus.FINISHED) == caching, b.finish_reason
    assert caching or "budget" in b.finish_reason
