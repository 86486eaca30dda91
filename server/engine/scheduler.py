"""The hf backend's scheduler: it plans each step under one token budget and never calls the model.

Shaped after vLLM V1's scheduler (``vllm/v1/core/sched/scheduler.py``): there is no prefill phase
and no decode phase. Every step, :meth:`Scheduler.schedule` spends one budget of tokens on

1. a token for every running request that decodes (they are why a step must stay short), then
2. the prefill chunks and GemFilter filter-pass chunks of the running requests that are not
   decoding yet, from the budget left: the oldest gets up to half of it, the rest goes to the
   least work left first (:func:`prefill_shares`), so a short prompt advances beside a long one
   instead of waiting behind all of it, and nobody starves, then
3. the waiting requests, first come first served, while the batch has room.

A chunk's tokens count by their cost: a prefill token at position ``p`` costs
``1 + p / break_even`` tokens (its attention grows with the keys before it; ``break_even`` is the
context at which one query's attention costs as much as its linear layers), and a filter-pass token
costs ``filter_cost`` (``(r + 1) / L``: the pass runs ``r + 1`` of ``L`` layers) times that. With
nobody decoding there is no token stream to keep smooth, and the step budget is ``idle_budget``
(None: unlimited, a prefill runs whole).

Memory is reserved as it is used (issue 25): a request holds its prompt after compression (plus,
after a preemption, the tokens it had generated), grows by one entry per decode step, and at most
``max_cache_tokens`` (what its method can ever hold). When a step's growth does not fit
``max_batch_tokens``, the newest running request is preempted: its cache is dropped and it waits at
the head of the queue (oldest first) to be recomputed. A request whose own largest cache exceeds
the budget is refused at admission (the engine's 400), so the oldest request always fits and runs.

The scheduler knows requests as numbers (:class:`Work`); what it returns is a :class:`StepPlan`
for the model runner (server/engine/runner.py) to execute, and :meth:`Scheduler.update` takes back
which requests finished or failed. It imports no model code: tests drive it with no model at all.
Thread safety: :meth:`add`, :meth:`cancel` and the counts may be called from any thread; the
rest from the one thread that steps the batch.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

# Tokens a step while requests decode. Measured on SmolLM2-135M bfloat16, 2 CPU cores
# (docs/benchmarks.md, "Continuous batching"): a forward streams every weight once whatever its
# size, so a chunk pays that beside its own compute; chunks of ~57 tokens made four streams with
# 512-token prompts reach 0.88-0.90 of the c4/c1 bound the step costs allow, chunks of ~116
# 0.97-1.00, at the same p99 inter-token latency (three rounds each, 2026-12-05). A 6.5K-token
# prompt beside three streams reached its first token in ~1.6x its time alone at 128 (2.1x at 64)
# while the streams' p99 rose to ~6.5-7x their p50 (4.6-6.5x at 64): no budget meets both the
# 1.5x and 3x targets on this CPU (the reading there says why).
DEFAULT_STEP_TOKENS = 128
# Requests in the batch at once: memory, not this, should bound the batch (a request holds what
# it uses), and a decode step of 32 requests costs little more than one of 8 on this CPU.
DEFAULT_MAX_RUNNING = 32


@dataclass
class Work:
    """One request as the scheduler sees it: sizes fixed at admission and its progress."""

    request_id: str
    prefill_tokens: int  # tokens the prefill runs: the prompt after compression (GemFilter: the kept ones)
    cache_tokens: int  # cache entries once prefilled (a KV method: what it keeps)
    max_cache_tokens: int  # the most entries it can ever hold (cache_tokens + max_tokens, or its method's cap)
    filter_tokens: int = 0  # the filter pass before the prefill (GemFilter), 0: none
    filter_cost: float = 1.0  # a filter-pass token's cost in prefill tokens: (r + 1) / L
    filter_tail: int = 1  # the pass's last chunk holds at least this many tokens (its scored window)
    chunked: bool = True  # the prefill may run in chunks (else whole, in one step)
    arrival: int = 0  # order of arrival: FCFS, and who is preempted first (the newest)
    # progress, reset by a preemption (but ``generated``)
    filtered: int = 0
    computed: int = 0  # prefill tokens run (generated ones re-run after a preemption included)
    replay_left: int = 0  # decode steps that re-feed generated tokens (unchunkable prefills, after preemption)
    decoded: int = 0  # decode forwards since the prefill that fed a new token
    generated: int = 0  # tokens sampled so far, kept across preemptions
    resumed_with: int = 0  # tokens generated when it was last preempted
    preemptions: int = 0

    # ---- where it is --------------------------------------------------------------------------
    @property
    def filtering(self) -> bool:
        return self.filtered < self.filter_tokens

    @property
    def prefill_total(self) -> int:
        """The prefill's tokens: after a preemption a chunkable prefill re-runs the generated tokens
        too (all but the last, which the next decode step feeds)."""
        return self.prefill_tokens + (self.replayed_tokens if self.chunked else 0)

    @property
    def replayed_tokens(self) -> int:
        return max(0, self.resumed_with - 1)

    @property
    def prefilling(self) -> bool:
        return not self.filtering and self.computed < self.prefill_total

    @property
    def decoding(self) -> bool:
        return not self.filtering and not self.prefilling

    # ---- memory -------------------------------------------------------------------------------
    @property
    def base_tokens(self) -> int:
        """Held from admission on: the prompt after compression and the tokens it regenerates."""
        return min(self.max_cache_tokens, self.cache_tokens + self.replayed_tokens)

    @property
    def peak_tokens(self) -> int:
        """The most it can hold at once: its largest cache, or its filter pass's."""
        return max(self.max_cache_tokens, math.ceil(self.filter_tokens * self.filter_cost))

    def reserved(self) -> int:
        """Cache entries this request holds now (the filter pass's cache of layers 0..r counted
        by its share of the layers)."""
        if self.filtering:
            return max(self.base_tokens, math.ceil(self.filter_tokens * self.filter_cost))
        return min(self.max_cache_tokens, self.base_tokens + self.decoded)

    def growth(self) -> int:
        """Entries a decode step adds (0 once at the method's cap: it evicts as it decodes)."""
        if not self.decoding or self.replay_left:
            return 0
        return 1 if self.base_tokens + self.decoded < self.max_cache_tokens else 0

    def preempt(self) -> None:
        self.filtered = self.computed = self.decoded = 0
        self.resumed_with = self.generated
        self.replay_left = 0 if self.chunked else self.replayed_tokens
        self.preemptions += 1


@dataclass(frozen=True)
class Chunk:
    """``tokens`` tokens of a request's prefill or filter pass, from token ``start``."""

    request_id: str
    start: int
    tokens: int
    last: bool  # it ends the prefill (or the pass)


@dataclass(frozen=True)
class Decode:
    request_id: str
    replay: bool = False  # re-feeds a token generated before a preemption: nothing is sampled


@dataclass
class StepPlan:
    """What one step runs, for the model runner."""

    decodes: list[Decode] = field(default_factory=list)
    prefills: list[Chunk] = field(default_factory=list)
    filters: list[Chunk] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # admitted this step: the runner sets them up
    preempted: list[str] = field(default_factory=list)  # their caches go before this step runs
    budget: float = math.inf  # the step's token budget
    cost: float = 0.0  # what the plan spends of it

    @property
    def empty(self) -> bool:
        return not (self.decodes or self.prefills or self.filters)

    def samples(self, work: dict[str, Work]) -> list[str]:
        """Requests this step gives a new token: every decode that is not a replay, and every
        prefill that ends before anything was generated."""
        decoded = [d.request_id for d in self.decodes if not d.replay]
        first = [c.request_id for c in self.prefills if c.last and work[c.request_id].generated == 0]
        return decoded + first


def prefill_cost(start: int, tokens: int, break_even: float) -> float:
    """Cost of prefill tokens ``start .. start + tokens - 1`` in linear-layer tokens."""
    return tokens * (1.0 + (start + (tokens - 1) / 2.0) / break_even)


def tokens_for(share: float, start: int, remaining: int, per_token: float, break_even: float) -> int:
    """The most tokens from ``start`` (at most ``remaining``) whose cost fits ``share``."""
    if share <= 0:
        return 0
    if prefill_cost(start, remaining, break_even) * per_token <= share:
        return remaining
    if math.isinf(break_even):  # attention costs nothing next to the linear layers
        return max(0, min(remaining, math.floor(share / per_token + 1e-9)))
    # cost(t) = per_token * t * (a + t / (2 b)), a = 1 + (start - 1/2) / b: the root of a quadratic
    a = 1.0 + (start - 0.5) / break_even
    quadratic = 1.0 / (2.0 * break_even)
    t = (-a + math.sqrt(a * a + 4.0 * quadratic * share / per_token)) / (2.0 * quadratic)
    tokens = min(remaining, math.floor(t + 1e-9))
    while tokens > 0 and prefill_cost(start, tokens, break_even) * per_token > share:
        tokens -= 1
    return tokens


class Scheduler:
    """Waiting and running requests, and the plan of each step (see the module doc)."""

    def __init__(
        self,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_batch_tokens: int | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        idle_budget: int | None = None,
        break_even: float = math.inf,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.step_tokens = step_tokens
        self.idle_budget = idle_budget
        self.break_even = break_even
        self._lock = threading.Lock()
        self._arrivals = 0
        self._waiting: list[Work] = []  # by arrival: a preempted request goes back before newer ones
        self._running: list[Work] = []  # by arrival
        self._cancelled: set[str] = set()
        self._step_growth = 0  # entries this step's planned decodes add
        self.preemptions = 0  # in total, for /metrics
        self.batch_size = 0  # requests the last step ran

    # ---- what other threads may call ------------------------------------------------------
    def add(self, work: Work) -> None:
        if self.max_batch_tokens is not None and work.peak_tokens > self.max_batch_tokens:
            raise ValueError(
                f"request {work.request_id} needs {work.peak_tokens} cache tokens, "
                f"more than max_batch_tokens={self.max_batch_tokens}"
            )
        with self._lock:
            work.arrival = self._arrivals
            self._arrivals += 1
            self._waiting.append(work)

    def cancel(self, request_id: str) -> None:
        """Forget the request at the next :meth:`schedule` (it is listed in the plan's preempted,
        its cache to be dropped, if it ran)."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running_tokens(self) -> int:
        """Cache entries the running requests hold."""
        return sum(w.reserved() for w in list(self._running))

    @property
    def waiting_tokens(self) -> int:
        """Cache entries the waiting requests will hold once admitted."""
        with self._lock:
            return sum(w.base_tokens for w in self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def work(self, request_id: str) -> Work | None:
        """The request's :class:`Work` while the scheduler holds it (running or waiting)."""
        with self._lock:
            return next((w for w in (*self._running, *self._waiting) if w.request_id == request_id), None)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step (the module doc says how); the plan's ``preempted`` lists the requests
        whose caches go first (preempted or cancelled)."""
        plan = StepPlan()
        self._drop_cancelled(plan)
        decoders = [w for w in self._running if w.decoding]
        plan.budget = float(self.step_tokens) if decoders else self._idle_budget()
        self._step_growth = 0
        self._plan_decodes(plan)
        self._admit(plan)
        self._plan_prefills(plan)
        self.batch_size = len(plan.decodes) + len(plan.prefills) + len(plan.filters)
        return plan

    def selected(self, request_id: str, kept: int) -> None:
        """A filter pass ended keeping ``kept`` prompt tokens: the prefill's size from now on (a
        fallback may widen it past the budget planned at admission, within its ``max_cache_tokens``)."""
        with self._lock:
            work = next((w for w in self._running if w.request_id == request_id), None)
            if work is not None:
                work.prefill_tokens = work.cache_tokens = min(kept, work.max_cache_tokens)

    def update(self, plan: StepPlan, finished: set[str] | None = None, failed: set[str] | None = None) -> list[str]:
        """Advance each request by what the plan ran; forget those that ``finished`` (a stop, the
        length, a cancel seen by the engine) or ``failed``. Returns the request ids forgotten."""
        ended = (finished or set()) | (failed or set())
        by_id = {w.request_id: w for w in self._running}
        for request_id in plan.samples(by_id):
            if request_id in by_id:
                by_id[request_id].generated += 1
        for chunk in plan.filters:
            if chunk.request_id in by_id:
                by_id[chunk.request_id].filtered = chunk.start + chunk.tokens
        for chunk in plan.prefills:
            if chunk.request_id in by_id:
                by_id[chunk.request_id].computed = chunk.start + chunk.tokens
        for decode in plan.decodes:
            work = by_id.get(decode.request_id)
            if work is None:
                continue
            if decode.replay:
                work.replay_left -= 1
            else:
                work.decoded += 1
        self._running = [w for w in self._running if w.request_id not in ended]
        return sorted(ended)

    def fail_all(self) -> list[str]:
        """The step itself failed: forget every request; their ids."""
        with self._lock:
            gone = [w.request_id for w in (*self._running, *self._waiting)]
            self._running, self._waiting = [], []
        return gone

    # ---- the plan's parts -------------------------------------------------------------------
    def _idle_budget(self) -> float:
        return math.inf if self.idle_budget is None else float(self.idle_budget)

    def _drop_cancelled(self, plan: StepPlan) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            self._waiting = [w for w in self._waiting if w.request_id not in cancelled]
        ran = [w for w in self._running if w.request_id in cancelled]
        self._running = [w for w in self._running if w.request_id not in cancelled]
        plan.preempted.extend(w.request_id for w in ran)

    def _used(self) -> int:
        return sum(w.reserved() for w in self._running)

    def _fits(self, extra: int) -> bool:
        """Does the batch's memory hold ``extra`` more entries beside this step's decode growth?"""
        used = self._used() + self._step_growth + extra
        return self.max_batch_tokens is None or used <= self.max_batch_tokens

    def _plan_decodes(self, plan: StepPlan) -> None:
        """A token for every decoding request, oldest first; when their growth does not fit the
        memory budget, the newest running request is preempted until it does."""
        index = 0
        while index < len(self._running):
            work = self._running[index]
            index += 1
            if not work.decoding:
                continue
            while not self._fits(work.growth()):
                victim = self._running[-1]
                self._preempt(victim, plan)
                if victim is work:
                    break
            else:
                self._step_growth += work.growth()
                plan.decodes.append(Decode(work.request_id, replay=work.replay_left > 0))
                plan.cost += 1.0
                continue
            index = len(self._running)  # the request itself was preempted: nobody after it is left

    def _preempt(self, work: Work, plan: StepPlan) -> None:
        self._running.remove(work)
        plan.decodes = [d for d in plan.decodes if d.request_id != work.request_id]
        if work.request_id in plan.started:
            plan.started.remove(work.request_id)
        else:
            plan.preempted.append(work.request_id)
        work.preempt()
        self.preemptions += 1
        with self._lock:
            self._waiting.append(work)
            self._waiting.sort(key=lambda w: w.arrival)

    def _admit(self, plan: StepPlan) -> None:
        """Waiting requests into the batch in arrival order, while there are slots, memory for
        their prompts, and budget for some of their work; a request that does not fit is not
        overtaken (first come first served)."""
        while len(self._running) < self.max_running and plan.cost < plan.budget:
            with self._lock:
                if not self._waiting:
                    return
                head = self._waiting[0]
                if not self._fits(head.reserved()):
                    return
                self._waiting.pop(0)
            self._running.append(head)
            self._running.sort(key=lambda w: w.arrival)
            plan.started.append(head.request_id)

    def _plan_prefills(self, plan: StepPlan) -> None:
        """The budget left, for the requests still filtering or prefilling (:func:`prefill_shares`)."""
        pending = [w for w in self._running if not w.decoding]
        if not pending:
            return
        left = max(0.0, plan.budget - plan.cost)  # the decodes may have spent it all
        needs = {w.request_id: self._cost_left(w) for w in pending}
        shares = prefill_shares(needs, left, [w.request_id for w in pending])
        for work in pending:
            chunk = self._chunk(work, shares[work.request_id], oldest=work is pending[0])
            if chunk is None:
                continue
            if work.filtering:
                plan.filters.append(chunk)
                plan.cost += prefill_cost(chunk.start, chunk.tokens, self.break_even) * work.filter_cost
            else:
                plan.prefills.append(chunk)
                plan.cost += prefill_cost(chunk.start, chunk.tokens, self.break_even)

    def _cost_left(self, work: Work) -> float:
        if work.filtering:
            left = work.filter_tokens - work.filtered
            return prefill_cost(work.filtered, left, self.break_even) * work.filter_cost
        return prefill_cost(work.computed, work.prefill_total - work.computed, self.break_even)

    def _chunk(self, work: Work, share: float, oldest: bool) -> Chunk | None:
        """The request's chunk within ``share``. The oldest pending request always advances (by a
        token, or the pass's tail, when its share is spent), and a prefill that cannot be chunked
        runs whole when it is the oldest: both may overrun the budget, never starve."""
        if work.filtering:
            start, remaining = work.filtered, work.filter_tokens - work.filtered
            tokens = tokens_for(share, start, remaining, work.filter_cost, self.break_even)
            if 0 < remaining - tokens < work.filter_tail:  # the pass's last chunk holds its scored window
                tokens = max(0, remaining - work.filter_tail)
            if tokens == 0 and oldest:
                tokens = remaining if remaining <= work.filter_tail else 1
        else:
            start, remaining = work.computed, work.prefill_total - work.computed
            if not work.chunked:  # whole or not at all
                fits = prefill_cost(start, remaining, self.break_even) <= share
                tokens = remaining if fits or oldest else 0
            else:
                tokens = tokens_for(share, start, remaining, 1.0, self.break_even)
                if tokens == 0 and oldest:
                    tokens = 1
        if tokens == 0:
            return None
        return Chunk(work.request_id, start, tokens, last=tokens == remaining)


def prefill_shares(needs: dict[str, float], budget: float, order: list[str]) -> dict[str, float]:
    """The step's prefill budget between the pending requests (``order``: oldest first): the oldest
    gets what it needs up to half of it (all of it when alone), so it never starves; the rest goes to
    the requests with the least work left first (ties: the older), so a short prompt passes a long one,
    and of equal prompts one finishes its prefill and starts decoding instead of all of them
    finishing late together (measured: three 512-token prompts sharing a step equally kept the batch
    at one decode for 13 steps; docs/benchmarks.md, "Continuous batching")."""
    shares = dict.fromkeys(needs, 0.0)
    if not order:
        return shares
    oldest = order[0]
    shares[oldest] = min(needs[oldest], budget if len(order) == 1 else budget / 2)
    left = budget - shares[oldest]
    for request_id in sorted(order, key=lambda i: (needs[i], order.index(i))):
        if left <= 0:
            break
        take = min(needs[request_id] - shares[request_id], left)
        shares[request_id] += take
        left -= take
    return shares
