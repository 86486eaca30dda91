"""The hf backend's scheduler (server/engine/scheduler.py), driven by a fake runner: no torch, no model.

The fake runner "executes" each plan by handing it back to :meth:`Scheduler.update`; it decides
itself which requests finished (a request ends when it has sampled its ``max_tokens`` tokens).
Every step it checks the invariants the module doc promises: the step budget (with its two
documented overruns), the plan's cost, the memory budget, first come first served admission, the
filter pass's tail, and that no token is lost or sampled twice across preemptions.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.engine.scheduler import (
    Chunk,
    Scheduler,
    StepPlan,
    Work,
    prefill_cost,
    prefill_shares,
    tokens_for,
)

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-9
BREAK_EVENS = [pytest.param(4000.0, id="break_even=4000"), pytest.param(math.inf, id="break_even=inf")]


def work(
    request_id: str,
    prompt: int,
    max_tokens: int,
    *,
    filtered: bool = False,
    filter_cost: float = 0.5,
    filter_tail: int = 32,
    kept: int | None = None,
    chunked: bool = True,
    cap: int | None = None,
) -> Work:
    """A request as the engine would size it: a GemFilter request filters its whole prompt, then
    prefills the ``kept`` tokens; ``cap`` is a KV method's cache cap (else prompt + max_tokens)."""
    prefill = (kept if kept is not None else max(1, prompt // 4)) if filtered else prompt
    return Work(
        request_id,
        prefill_tokens=prefill,
        cache_tokens=prefill,
        max_cache_tokens=cap if cap is not None else prefill + max_tokens,
        filter_tokens=prompt if filtered else 0,
        filter_cost=filter_cost if filtered else 1.0,
        filter_tail=filter_tail if filtered else 1,
        chunked=chunked,
    )


@dataclass
class FakeRunner:
    """Executes plans by calling ``update``; checks every plan against the scheduler's promises."""

    scheduler: Scheduler
    max_tokens: dict[str, int] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)  # started, not finished, preempted or cancelled
    waiting: set[str] = field(default_factory=set)
    sampled: Counter = field(default_factory=Counter)
    arrival: dict[str, int] = field(default_factory=dict)
    added_at: dict[str, int] = field(default_factory=dict)
    first_token_at: dict[str, int] = field(default_factory=dict)
    done_at: dict[str, int] = field(default_factory=dict)
    generated_at_end: dict[str, int] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)
    samples: list[list[str]] = field(default_factory=list)  # per step, the requests given a token
    replays: Counter = field(default_factory=Counter)
    overruns: int = 0  # plans over budget (each one checked against the documented rule)
    steps: int = 0

    def add(self, w: Work, max_tokens: int) -> None:
        self.scheduler.add(w)
        self.max_tokens[w.request_id] = max_tokens
        self.arrival[w.request_id] = w.arrival
        self.added_at[w.request_id] = self.steps
        self.waiting.add(w.request_id)

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)
        self.waiting.discard(request_id)
        self.max_tokens.pop(request_id)

    def step(self) -> StepPlan:
        sched = self.scheduler
        plan = sched.schedule()
        for request_id in plan.preempted:  # their caches go first
            assert request_id in self.running, f"{request_id} preempted but not running"
            self.running.discard(request_id)
            if sched.work(request_id) is not None:  # preempted (a cancelled one is forgotten)
                self.waiting.add(request_id)
        for request_id in plan.started:
            assert request_id in self.waiting, f"{request_id} started but not waiting"
            self.waiting.discard(request_id)
            self.running.add(request_id)
        works = {request_id: sched.work(request_id) for request_id in self.running}
        assert all(w is not None for w in works.values())
        assert sched.num_running == len(self.running)
        assert sched.num_waiting == len(self.waiting)
        self.check_plan(plan, works)
        self.check_fcfs(plan)

        samples = plan.samples(works)
        ended = set()
        for request_id in samples:
            self.sampled[request_id] += 1
            self.first_token_at.setdefault(request_id, self.steps)
            assert self.sampled[request_id] <= self.max_tokens[request_id], f"{request_id} sampled too many tokens"
            if self.sampled[request_id] == self.max_tokens[request_id]:
                ended.add(request_id)
        for decode in plan.decodes:
            if decode.replay:
                self.replays[decode.request_id] += 1
        reserved_before = {request_id: w.reserved() for request_id, w in works.items()}
        forgotten = sched.update(plan, finished=ended)
        assert forgotten == sorted(ended)
        for request_id in ended:
            self.generated_at_end[request_id] = works[request_id].generated
            self.done_at[request_id] = self.steps
        self.running -= ended
        self.check_memory(plan, works, reserved_before)
        self.plans.append(plan)
        self.samples.append(samples)
        self.steps += 1
        return plan

    def run(self, max_steps: int = 10_000) -> None:
        while self.scheduler.has_work():
            self.step()
            assert self.steps < max_steps, "the scheduler did not finish its requests"
        for request_id, limit in self.max_tokens.items():
            assert self.sampled[request_id] == limit, f"{request_id}: {self.sampled[request_id]} tokens, not {limit}"
            assert self.generated_at_end[request_id] == limit

    # ---- the checks -------------------------------------------------------------------------
    def check_plan(self, plan: StepPlan, works: dict[str, Work]) -> None:
        sched = self.scheduler
        ids = [d.request_id for d in plan.decodes] + [c.request_id for c in (*plan.prefills, *plan.filters)]
        assert len(ids) == len(set(ids)), f"a request twice in one plan: {ids}"
        assert set(ids) <= set(works), "a plan runs a request that is not running"
        for decode in plan.decodes:
            w = works[decode.request_id]
            assert w.decoding
            assert decode.replay == (w.replay_left > 0)
        for chunk in plan.filters:
            w = works[chunk.request_id]
            assert w.filtering and chunk.start == w.filtered and chunk.tokens >= 1, f"{chunk} for {w}"
            end = chunk.start + chunk.tokens
            assert end <= w.filter_tokens and chunk.last == (end == w.filter_tokens)
            # the pass's last chunk holds its scored window: never 0 < remaining < tail
            assert not 0 < w.filter_tokens - end < w.filter_tail, f"{chunk} leaves less than the tail of {w}"
            if chunk.last:
                assert chunk.tokens >= min(w.filter_tail, w.filter_tokens)
        for chunk in plan.prefills:
            w = works[chunk.request_id]
            assert w.prefilling and chunk.start == w.computed and chunk.tokens >= 1, f"{chunk} for {w}"
            end = chunk.start + chunk.tokens
            assert end <= w.prefill_total and chunk.last == (end == w.prefill_total)
            if not w.chunked:
                assert chunk.start == 0 and chunk.last, f"an unchunked prefill ran in pieces: {chunk}"

        # the plan's cost: a token per decode, a chunk's tokens weighted by attention and layers
        be = sched.break_even
        cost = len(plan.decodes)
        cost += sum(prefill_cost(c.start, c.tokens, be) for c in plan.prefills)
        cost += sum(prefill_cost(c.start, c.tokens, be) * works[c.request_id].filter_cost for c in plan.filters)
        assert plan.cost == pytest.approx(cost, rel=1e-12, abs=1e-9)
        self.check_budget(plan, works)

    def check_budget(self, plan: StepPlan, works: dict[str, Work]) -> None:
        """cost <= budget, but for the documented overruns: the oldest pending request (filtering
        or prefilling) advances when its share is spent, by one token, or by its whole remaining
        pass when that is at most the filter tail, and an unchunked prefill runs whole when it is
        the oldest. Everything else in the plan still fits the budget. (Every decoding request gets its
        token whatever the budget: with more of them than the budget, the decodes alone are the limit.)"""
        be = self.scheduler.break_even
        limit = max(plan.budget, len(plan.decodes))
        if plan.cost <= limit + EPS:
            return
        self.overruns += 1
        pending = sorted((w for w in works.values() if not w.decoding), key=lambda w: w.arrival)
        assert pending, f"over budget with nothing pending: {plan}"
        oldest = pending[0]
        chunks = [c for c in (*plan.prefills, *plan.filters) if c.request_id == oldest.request_id]
        assert len(chunks) == 1, f"over budget, but the oldest pending request {oldest.request_id} has no chunk"
        chunk = chunks[0]
        if oldest.filtering:
            remaining = oldest.filter_tokens - oldest.filtered
            assert chunk.tokens == 1 or chunk.tokens == remaining <= oldest.filter_tail, (chunk, oldest)
            chunk_cost = prefill_cost(chunk.start, chunk.tokens, be) * oldest.filter_cost
        else:
            remaining = oldest.prefill_total - oldest.computed
            if oldest.chunked:
                assert chunk.tokens == 1, (chunk, oldest)
            else:
                assert chunk.tokens == remaining, (chunk, oldest)
            chunk_cost = prefill_cost(chunk.start, chunk.tokens, be)
        assert plan.cost - chunk_cost <= limit + EPS, f"over budget beyond the oldest's chunk: {plan}"

    def check_fcfs(self, plan: StepPlan) -> None:
        """Admission is first come first served: nobody left waiting is older than one admitted."""
        if plan.started:
            newest_started = max(self.arrival[r] for r in plan.started)
            older_waiting = [r for r in self.waiting if self.arrival[r] < newest_started]
            assert not older_waiting, f"{plan.started} admitted before older {older_waiting}"
        order = [self.arrival[r] for r in plan.started]
        assert order == sorted(order)

    def check_memory(self, plan: StepPlan, works: dict[str, Work], reserved_before: dict[str, int]) -> None:
        sched = self.scheduler
        held = sum(works[r].reserved() for r in self.running)
        assert sched.running_tokens == held
        if sched.max_batch_tokens is not None:
            assert held <= sched.max_batch_tokens, f"{held} cache entries held, budget {sched.max_batch_tokens}"
        # a decode that feeds a new token adds one entry (none at the method's cap, none for a replay)
        for decode in plan.decodes:
            if decode.request_id not in self.running:
                continue
            w = works[decode.request_id]
            grew = w.reserved() - reserved_before[decode.request_id]
            if decode.replay:
                assert grew == 0
            else:
                assert grew == (0 if reserved_before[decode.request_id] == w.max_cache_tokens else 1)
        for chunk in plan.prefills:  # a prefill chunk holds nothing beyond what admission reserved
            if chunk.request_id in self.running:
                assert works[chunk.request_id].reserved() == reserved_before[chunk.request_id]


def test_the_scheduler_imports_no_torch() -> None:
    code = "import sys, server.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- 1. the step budget and the plan's cost ------------------------------------------------
def random_request(rng: random.Random, request_id: str, max_prompt: int, max_new: int) -> tuple[Work, int]:
    """Prompts of 1..max_prompt tokens (mostly short, log-uniform), a third of them through a filter
    pass (cost 0.5, tail 32) that keeps up to 600 tokens, a fifth unchunkable."""
    log_uniform = int(math.exp(rng.uniform(0.0, math.log(max_prompt))))
    prompt = max(1, min(max_prompt, log_uniform if rng.random() < 0.8 else rng.randint(1, max_prompt)))
    max_tokens = rng.randint(1, max_new)
    kind = rng.random()
    if kind < 0.3:
        kept = max(1, min(prompt, rng.randint(1, 600)))
        return work(
            request_id, prompt, max_tokens, filtered=True, filter_cost=0.5, filter_tail=32, kept=kept
        ), max_tokens
    if kind < 0.5:
        return work(request_id, prompt, max_tokens, chunked=False), max_tokens
    return work(request_id, prompt, max_tokens), max_tokens


def random_run(
    seed: int,
    break_even: float,
    *,
    max_batch_tokens: int | None = None,
    idle_budget: int | None = None,
    step_tokens: int = 96,
    max_prompt: int = 5000,
    max_new: int = 24,
) -> FakeRunner:
    """Three long decoders from the start, then 30 random requests arriving at random steps, run to
    the end by the fake runner (which checks every plan); every request gets exactly its tokens."""
    rng = random.Random(seed)
    sched = Scheduler(
        max_running=6,
        max_batch_tokens=max_batch_tokens,
        step_tokens=step_tokens,
        idle_budget=idle_budget,
        break_even=break_even,
    )
    runner = FakeRunner(sched)
    for i in range(3):
        runner.add(work(f"decoder{i}", rng.randint(1, 40), 200), 200)
    arrivals = 0
    while sched.has_work() or arrivals < 30:
        if arrivals < 30 and rng.random() < 0.25:
            runner.add(*random_request(rng, f"r{arrivals}", max_prompt, max_new))
            arrivals += 1
        runner.step()
        assert runner.steps < 20_000
    for request_id, limit in runner.max_tokens.items():
        assert runner.sampled[request_id] == limit == runner.generated_at_end[request_id], request_id
    return runner


@pytest.mark.parametrize("break_even", BREAK_EVENS)
@pytest.mark.parametrize(("idle_budget", "step_tokens"), [(None, 96), (256, 96), (None, 12)])
def test_the_step_budget_holds_but_for_the_documented_overruns(
    break_even: float, idle_budget: int | None, step_tokens: int
) -> None:
    """The fake runner checks every plan (FakeRunner.check_budget, check_plan): its cost is the sum
    of its parts, and over the budget only by the oldest pending request's forced chunk."""
    overruns = within = 0
    for seed in range(4):
        runner = random_run(seed, break_even, idle_budget=idle_budget, step_tokens=step_tokens)
        overruns += runner.overruns
        within += sum(1 for p in runner.plans if (p.prefills or p.filters) and p.decodes and p.cost <= p.budget)
        # decoders were there, so the budget was the step's tokens
        assert any(p.budget == step_tokens and (p.prefills or p.filters) for p in runner.plans)
        if idle_budget is not None:
            assert any(p.budget == idle_budget and not p.decodes for p in runner.plans)
    assert within > 20, "too few mixed steps to say anything"
    assert overruns > 0, "no overrun happened: the documented exceptions went untested"


def test_the_plan_cost_formula_by_hand() -> None:
    """One decoder and a prefill at position 0: the prefill takes the 95 tokens left, costed by its attention."""
    sched = Scheduler(step_tokens=96, break_even=4000.0)
    runner = FakeRunner(sched)
    runner.add(work("d", 4, 10), 10)
    runner.step()
    runner.add(work("p", 3000, 1), 1)
    plan = runner.step()
    (chunk,) = plan.prefills
    assert chunk.tokens == tokens_for(95.0, 0, 3000, 1.0, 4000.0)
    assert 0 < chunk.tokens < 95  # the attention made the tokens cost more than one each
    assert plan.cost == pytest.approx(1 + chunk.tokens * (1 + (chunk.tokens - 1) / 2 / 4000))
    assert plan.cost <= 96.0


# ---- 2. memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("break_even", BREAK_EVENS)
def test_memory_never_exceeds_max_batch_tokens(break_even: float) -> None:
    """The fake runner checks after every step that the running requests hold at most
    max_batch_tokens entries (what running_tokens reports), and that a decode adds one."""
    preemptions = 0
    for seed in range(4):
        runner = random_run(100 + seed, break_even, max_batch_tokens=2000, max_prompt=1500, max_new=300)
        preemptions += runner.scheduler.preemptions
    assert preemptions > 5, "memory hardly ran short: the test did not test it"


def test_requests_grow_one_entry_per_decode_up_to_their_cap() -> None:
    sched = Scheduler(max_batch_tokens=1000)
    runner = FakeRunner(sched)
    runner.add(work("free", 100, 20), 20)
    runner.add(work("capped", 100, 20, cap=105), 20)  # a KV method that holds at most 105 entries
    runner.step()  # idle: both prefill whole
    assert sched.running_tokens == 200
    while sched.has_work():
        runner.step()  # the runner checks each decode's growth and running_tokens
        free, capped = sched.work("free"), sched.work("capped")
        if free is not None:
            assert free.reserved() == 100 + free.decoded
        if capped is not None:
            assert capped.reserved() == min(105, 100 + capped.decoded)
    assert runner.sampled == {"free": 20, "capped": 20}


def test_a_capped_request_adds_nothing_at_its_cap() -> None:
    """free holds up to 130 entries, capped at most 105: 234 hold them both when a decode at the cap
    is counted as the nothing it adds (counting it as one entry would preempt capped at the end)."""
    sched = Scheduler(max_batch_tokens=234)
    runner = FakeRunner(sched)
    runner.add(work("free", 100, 30), 30)
    runner.add(work("capped", 100, 30, cap=105), 30)
    runner.run()
    assert sched.preemptions == 0
    assert max(len(p.decodes) for p in runner.plans) == 2


# ---- 3. first come first served, no starvation ---------------------------------------------
def test_a_waiting_request_is_not_overtaken_by_a_later_one_that_fits() -> None:
    sched = Scheduler(max_batch_tokens=1000)
    runner = FakeRunner(sched)
    runner.add(work("a", 600, 30), 30)
    runner.step()
    runner.add(work("big", 500, 5), 5)  # 600 + 500 > 1000: waits for a
    runner.add(work("small", 50, 5), 5)  # would fit beside a, but arrived after big
    while "a" not in runner.done_at:
        plan = runner.step()
        assert plan.started == []
        assert sched.num_waiting == 2
    plan = runner.step()
    assert plan.started == ["big", "small"]
    runner.run()


def test_a_full_batch_admits_in_arrival_order() -> None:
    sched = Scheduler(max_running=2)
    runner = FakeRunner(sched)
    for i in range(6):
        runner.add(work(f"r{i}", 10 * (6 - i), 3 + i), 3 + i)
    runner.run()
    starts = [r for p in runner.plans for r in p.started]
    assert starts == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("break_even", BREAK_EVENS)
def test_a_short_prompt_is_not_starved_behind_a_long_one(break_even: float) -> None:
    sched = Scheduler(step_tokens=96, break_even=break_even)
    runner = FakeRunner(sched)
    for i in range(3):
        runner.add(work(f"d{i}", 8, 400), 400)
    runner.step()  # idle: they prefill whole, then decode
    runner.add(work("long", 5000, 1), 1)
    runner.step()
    assert sched.work("long").prefilling and sched.work("long").computed > 0
    runner.add(work("short", 50, 1), 1)
    short_added = runner.steps
    plan = runner.step()
    assert {c.request_id for c in plan.prefills} == {"long", "short"}, "the short one advances beside the long one"
    assert len(plan.decodes) == 3
    while "long" not in runner.first_token_at:
        runner.step()
    short_wait = runner.first_token_at["short"] - short_added + 1
    long_wait = runner.first_token_at["long"] - runner.added_at["long"] + 1
    assert short_wait <= 2, f"the short prompt waited {short_wait} steps"
    assert long_wait >= 50, f"the long prompt took only {long_wait} steps"


# ---- 4. preemption and resume --------------------------------------------------------------
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "unchunked"])
def test_the_newest_is_preempted_and_resumes_without_losing_a_token(chunked: bool) -> None:
    sched = Scheduler(max_running=4, max_batch_tokens=100, step_tokens=96)
    runner = FakeRunner(sched)
    runner.add(work("a", 40, 30), 30)  # at most 70 entries each
    runner.add(work("b", 40, 30, chunked=chunked), 30)
    runner.step()  # idle: both prefill whole, 80 entries
    runner.add(work("c", 30, 5), 5)  # 30 more do not fit beside a and b: c waits
    while not runner.plans[-1].preempted:
        plan = runner.step()
        assert plan.started == []
    plan = runner.plans[-1]
    assert plan.preempted == ["b"], "the newest running request goes"
    assert [d.request_id for d in plan.decodes] == ["a"]
    assert sched.preemptions == 1
    b = sched.work("b")
    assert b.preemptions == 1 and b.computed == 0 and b.decoded == 0
    generated = b.generated
    assert generated == runner.sampled["b"] > 1
    assert b.resumed_with == generated
    assert sched.num_waiting == 2
    # b waits ahead of c, which arrived later (c would fit beside a: 51 + 30 <= 100, but does not overtake)
    assert sched.running_tokens + 30 <= 100

    preempted_at = runner.steps
    runner.run()
    started = {r: i for i, p in enumerate(runner.plans) for r in p.started}  # the last start of each
    assert preempted_at <= started["b"] <= started["c"], "b waits ahead of c"
    assert started["b"] == runner.done_at["a"] + 1, "b runs again as soon as a's memory is free"
    plans_after = runner.plans[started["b"] :]
    b_prefills = [c for p in plans_after for c in p.prefills if c.request_id == "b"]
    replays = [(i, d) for i, p in enumerate(plans_after) for d in p.decodes if d.request_id == "b" and d.replay]
    if chunked:
        # a chunked prefill re-runs the generated tokens but the last (the next decode feeds it)
        assert sum(c.tokens for c in b_prefills) == 40 + generated - 1
        assert b_prefills[-1].start + b_prefills[-1].tokens == 40 + generated - 1 and b_prefills[-1].last
        assert replays == []
    else:
        assert [(c.start, c.tokens, c.last) for c in b_prefills] == [(0, 40, True)]
        assert len(replays) == generated - 1 == runner.replays["b"]
        for i, _ in replays:  # a replay samples nothing
            assert "b" not in runner.samples[started["b"] + i]
    # the prefill that resumes b samples nothing: b's next token comes from its next real decode
    last = next(i for i, p in enumerate(plans_after) if any(c.request_id == "b" and c.last for c in p.prefills))
    assert "b" not in runner.samples[started["b"] + last]
    assert runner.sampled == {"a": 30, "b": 30, "c": 5}
    assert sched.preemptions == 1


def test_a_request_larger_than_the_batch_memory_is_refused() -> None:
    sched = Scheduler(max_batch_tokens=100)
    with pytest.raises(ValueError, match="more than max_batch_tokens=100"):
        sched.add(work("big", 90, 11))  # 101 entries at its largest
    with pytest.raises(ValueError, match="max_batch_tokens"):
        sched.add(work("pass", 300, 1, filtered=True, filter_cost=0.5, kept=10))  # its pass holds 150
    sched.add(work("fits", 90, 10))  # exactly 100
    sched.add(work("pass fits", 200, 1, filtered=True, filter_cost=0.5, kept=10))
    assert sched.num_waiting == 2


def test_the_oldest_pending_request_advances_when_its_share_buys_no_token() -> None:
    """Seven decodes leave one token of an 8-token step: the oldest of two prefills gets it (half as
    its floor, half as the one with less work left), which buys its first token; from then on a token
    costs more than one, so it still advances by one token a step (over budget); the other waits."""
    sched = Scheduler(max_running=9, step_tokens=8, break_even=4000.0)
    runner = FakeRunner(sched)
    for i in range(7):
        runner.add(work(f"d{i}", 4, 40), 40)
    runner.step()  # idle: they prefill whole
    runner.add(work("first", 3, 1), 1)
    runner.add(work("second", 3, 1), 1)
    for expected in range(3):
        plan = runner.step()
        assert len(plan.decodes) == 7
        assert [(c.request_id, c.start, c.tokens) for c in plan.prefills] == [("first", expected, 1)]
        assert plan.cost == pytest.approx(7 + prefill_cost(expected, 1, 4000.0))
        assert plan.cost >= 7 + 1.0  # its whole share, and beyond it from the second token on
    assert runner.first_token_at["first"] == 3
    plan = runner.step()
    assert [(c.request_id, c.start, c.tokens) for c in plan.prefills] == [("second", 0, 1)]
    runner.run()


# ---- 5. cancel ---------------------------------------------------------------------------------
def test_cancel_a_waiting_a_prefilling_and_a_decoding_request() -> None:
    sched = Scheduler(max_running=3, step_tokens=96)
    runner = FakeRunner(sched)
    runner.add(work("d1", 10, 50), 50)
    runner.add(work("d2", 10, 50), 50)
    runner.step()  # idle: both prefill whole
    runner.add(work("prefilling", 5000, 5), 5)
    runner.add(work("waiting", 10, 5), 5)  # no slot: max_running is 3
    runner.add(work("later", 10, 5), 5)
    runner.step()
    assert sched.work("prefilling").prefilling and sched.work("prefilling").computed > 0
    assert sched.work("d2").decoding and runner.sampled["d2"] == 2
    assert sched.num_waiting == 2
    for request_id in ("waiting", "prefilling", "d2"):
        runner.cancel(request_id)
    plan = runner.step()
    assert sorted(plan.preempted) == ["d2", "prefilling"], "the runner drops the caches of the running ones"
    assert [d.request_id for d in plan.decodes] == ["d1"]
    assert plan.started == ["later"]
    assert {c.request_id for c in plan.prefills} == {"later"}
    for request_id in ("waiting", "prefilling", "d2"):
        assert sched.work(request_id) is None
    assert sched.preemptions == 0, "a cancel is no preemption"
    runner.run()
    assert runner.sampled["d1"] == 50 and runner.sampled["later"] == 5
    assert runner.sampled["d2"] == 2 and runner.sampled["waiting"] == 0 and runner.sampled["prefilling"] == 0


# ---- 6. filter-pass chunks -------------------------------------------------------------------
@pytest.mark.parametrize("break_even", BREAK_EVENS)
def test_filter_chunks_are_sized_by_their_layer_cost(break_even: float) -> None:
    """A filter pass at a quarter of the layers gets ~4x the tokens a prefill gets from the same
    share; the pass (less work left) goes first, its prefill after it."""

    def first_chunk(filtered: bool) -> Chunk:
        sched = Scheduler(step_tokens=96, break_even=break_even)
        runner = FakeRunner(sched)
        runner.add(work("d", 4, 500), 500)
        runner.step()
        runner.add(work("pass", 4000, 1, filtered=filtered, filter_cost=0.25, kept=500), 1)
        plan = runner.step()
        assert plan.cost <= plan.budget
        (chunk,) = plan.filters if filtered else plan.prefills
        return chunk

    share = 96 - 1  # the decode's token, then the rest to the one pending request
    filter_chunk, prefill_chunk = first_chunk(True), first_chunk(False)
    assert filter_chunk.tokens == tokens_for(share, 0, 4000, 0.25, break_even)
    assert prefill_chunk.tokens == tokens_for(share, 0, 4000, 1.0, break_even)
    assert 3.8 <= filter_chunk.tokens / prefill_chunk.tokens <= 4.3
    sched = Scheduler(step_tokens=96, break_even=break_even)
    runner = FakeRunner(sched)
    runner.add(work("d", 4, 500), 500)
    runner.step()
    runner.add(work("pass", 4000, 1, filtered=True, filter_cost=0.25, kept=500), 1)
    runner.add(work("prefill", 4000, 1), 1)
    runner.run()
    pass_steps = [i for i, p in enumerate(runner.plans) if any(c.request_id == "pass" for c in p.filters)]
    prefill_steps = [i for i, p in enumerate(runner.plans) if any(c.request_id == "pass" for c in p.prefills)]
    assert len(pass_steps) > 1 and prefill_steps
    assert max(pass_steps) < min(prefill_steps), "the prefill starts only after the pass"
    assert runner.sampled["pass"] == 1


def test_the_last_filter_chunk_holds_the_tail() -> None:
    """A share of 95 tokens buys 380 filter tokens at 0.25 a token: 770 = 380 + 358 + 32, not 380 + 380 + 10."""
    sched = Scheduler(step_tokens=96)
    runner = FakeRunner(sched)
    runner.add(work("d", 4, 100), 100)
    runner.step()
    runner.add(work("pass", 770, 1, filtered=True, filter_cost=0.25, filter_tail=32, kept=100), 1)
    chunks: list[Chunk] = []
    prefills: list[tuple[int, Chunk]] = []
    while sched.has_work():
        plan = runner.step()
        chunks.extend(plan.filters)
        prefills.extend((runner.steps, c) for c in plan.prefills if c.request_id == "pass")
    assert [(c.start, c.tokens, c.last) for c in chunks] == [(0, 380, False), (380, 358, False), (738, 32, True)]
    # after the pass, its 100 kept tokens: 95 (the step's tokens less the decode's), then 5
    assert [(step, c.tokens) for step, c in prefills] == [(5, 95), (6, 5)]
    assert runner.sampled["pass"] == 1


@pytest.mark.parametrize("first", ["pass", "long"])
def test_a_pass_shorter_than_its_tail_runs_in_one_chunk(first: str) -> None:
    """A pass of 20 tokens with a tail of 32 is one chunk. When it is the oldest pending request and
    its share cannot pay for it, it runs whole anyway (a documented overrun); when it is not the
    oldest, it waits for a share that pays for all of it."""
    sched = Scheduler(step_tokens=8, max_running=8)
    runner = FakeRunner(sched)
    for i in range(4):
        runner.add(work(f"d{i}", 4, 60), 60)
    runner.step()
    requests = {
        "pass": (work("pass", 20, 1, filtered=True, filter_cost=1.0, filter_tail=32, kept=5), 1),
        "long": (work("long", 400, 1), 1),
    }
    runner.add(*requests[first])
    runner.add(*requests["long" if first == "pass" else "pass"])
    runner.run()
    filter_chunks = [(i, c) for i, p in enumerate(runner.plans) for c in p.filters]
    assert [(c.start, c.tokens, c.last) for _, c in filter_chunks] == [(0, 20, True)]
    (step, _), plan = filter_chunks[0], runner.plans[filter_chunks[0][0]]
    if first == "pass":
        assert step == 1 and plan.cost > plan.budget == 8.0, "the oldest runs its pass whole, over budget"
    else:
        assert plan.cost <= plan.budget


# ---- 7. prefill shares --------------------------------------------------------------------------
def test_prefill_shares_by_hand() -> None:
    # c is the oldest: half of 300; the rest by least work left: a, b, then c's own need
    assert prefill_shares({"a": 10.0, "b": 100.0, "c": 1000.0}, 300.0, ["c", "b", "a"]) == {
        "a": 10.0,
        "b": 100.0,
        "c": 190.0,
    }
    # equal prompts: the oldest takes all it can, the next what is left
    assert prefill_shares({"a": 500.0, "b": 500.0, "c": 500.0}, 64.0, ["a", "b", "c"]) == {
        "a": 64.0,
        "b": 0.0,
        "c": 0.0,
    }
    assert prefill_shares({"a": 40.0, "b": 500.0, "c": 500.0}, 64.0, ["a", "b", "c"]) == {
        "a": 40.0,
        "b": 24.0,
        "c": 0.0,
    }
    # a long oldest keeps half; a short newer one the other half
    assert prefill_shares({"long": 5000.0, "short": 50.0}, 96.0, ["long", "short"]) == {"long": 48.0, "short": 48.0}
    assert prefill_shares({"a": 1.0, "b": 2.0}, 10.0, ["a", "b"]) == {"a": 1.0, "b": 2.0}
    assert prefill_shares({"a": 100.0}, 10.0, ["a"]) == {"a": 10.0}
    assert prefill_shares({}, 10.0, []) == {}


def test_prefill_shares_properties() -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randint(1, 8)
        ids = [f"r{i}" for i in range(n)]
        needs = {i: rng.choice([rng.uniform(0.1, 20.0), rng.uniform(20.0, 500.0), 5.0]) for i in ids}
        budget = rng.uniform(0.0, 400.0)
        shares = prefill_shares(needs, budget, ids)
        assert set(shares) == set(ids)
        assert sum(shares.values()) <= budget + 1e-6
        assert all(0.0 <= shares[i] <= needs[i] + 1e-9 for i in ids)
        floor = budget if n == 1 else budget / 2
        assert shares[ids[0]] >= min(needs[ids[0]], floor) - 1e-9, "the oldest never starves"
        unmet = [i for i in ids if shares[i] < needs[i] - 1e-9]
        if unmet:
            assert sum(shares.values()) == pytest.approx(budget), "nothing is left over"
        others = sorted(ids[1:], key=lambda i: (needs[i], ids.index(i)))
        got = [shares[i] >= needs[i] - 1e-9 for i in others]
        assert got == sorted(got, reverse=True), "the least work left is met first"
        assert sum(0.0 < shares[i] < needs[i] - 1e-9 for i in others) <= 1, "at most one is cut short"


# ---- 8. idle steps ---------------------------------------------------------------------------
@pytest.mark.parametrize("break_even", BREAK_EVENS)
def test_with_nobody_decoding_a_prefill_runs_whole(break_even: float) -> None:
    sched = Scheduler(break_even=break_even)
    runner = FakeRunner(sched)
    runner.add(work("long", 5000, 2), 2)
    runner.add(work("pass", 5000, 2, filtered=True, kept=700), 2)
    plan = runner.step()
    assert plan.budget == math.inf
    assert [(c.request_id, c.start, c.tokens, c.last) for c in plan.prefills] == [("long", 0, 5000, True)]
    assert [(c.request_id, c.start, c.tokens, c.last) for c in plan.filters] == [("pass", 0, 5000, True)]
    plan = runner.step()  # long decodes now, so the kept tokens' prefill is chunked within the step budget
    assert [d.request_id for d in plan.decodes] == ["long"]
    assert plan.budget == sched.step_tokens


def test_an_idle_prefill_after_a_pass_runs_whole() -> None:
    sched = Scheduler()
    runner = FakeRunner(sched)
    runner.add(work("pass", 5000, 2, filtered=True, kept=700), 2)
    runner.step()
    plan = runner.step()
    assert [(c.start, c.tokens, c.last) for c in plan.prefills] == [(0, 700, True)]
    assert runner.samples[-1] == ["pass"]


def test_an_idle_budget_chunks_prefills() -> None:
    sched = Scheduler(idle_budget=256)
    runner = FakeRunner(sched)
    runner.add(work("long", 1000, 1), 1)
    runner.run()
    assert [c.tokens for p in runner.plans for c in p.prefills] == [256, 256, 256, 232]


# ---- more decoders than the step budget ------------------------------------------------------
@pytest.mark.parametrize("break_even", BREAK_EVENS)
def test_more_decoders_than_step_tokens_still_advance_the_oldest_prefill(break_even: float) -> None:
    """max_num_batched_tokens below max_concurrency is allowed (both only need >= 1). When the
    decodes alone spend more than the step budget, the oldest pending prefill must still advance
    by at least one token (its documented overrun), never by a negative chunk."""
    sched = Scheduler(max_running=8, step_tokens=4, idle_budget=60, break_even=break_even)
    runner = FakeRunner(sched)
    for i in range(6):
        runner.add(work(f"d{i}", 1, 30), 30)
    runner.add(work("long", 1000, 1), 1)
    runner.step()  # idle budget 60: the six 1-token prompts and 53 tokens of the long one
    plan = runner.step()
    assert len(plan.decodes) == 6
    (chunk,) = plan.prefills
    assert chunk.tokens >= 1, f"the oldest pending prefill got {chunk}"
    runner.run()
