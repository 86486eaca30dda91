"""RULER-style long-context tasks with checkable answers, sized to a token budget (stdlib only).

``build_sample(task, haystack, target_tokens, depth, seed, count_tokens)`` returns a ``Sample``
whose full prompt, as the caller's ``count_tokens`` counts it, lands within 2% under the target.
Tasks: needle retrieval (single, multikey, multivalue, multiquery), variable tracking (vt),
common words extraction (cwe) and QA over synthetic facts (qa). Everything is deterministic
given the seed; every needle's answer occurs exactly once in the context.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import accumulate, pairwise

from contract.needles import PLACES, WORDS
from evals.haystacks import HAYSTACKS, FillerStream, check_haystack, separator, vocabulary
from evals.scoring import count_occurrences

TOP_UP_GAP = 0.01  # below target * (1 - TOP_UP_GAP), top up with part of the next unit
TASKS_WITHOUT_DEPTH = frozenset({"cwe"})
VALUE_KINDS = ("number", "code", "word")
_ALL_VOCABULARY = frozenset().union(*(vocabulary(kind) for kind in HAYSTACKS))
VALUE_WORDS = tuple(w for w in WORDS if w not in _ALL_VOCABULARY)  # a word value must not occur in filler
NEEDLE_COUNT = 4  # multikey (1 target + 3 distractors), multivalue, multiquery
VT_HOPS = 4
CWE_COMMON = 10
CWE_RARE_REPEATS = 3
# Top-up granularity: a word or one punctuation mark (a table rule is one "word" but many tokens).
# Whole words and digit groups only, so a cut never makes a new number.
PIECE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Sample:
    task: str
    haystack: str
    target_tokens: int
    depth: float | None  # 0.0 = start of the context, 1.0 = end; None for tasks without one
    seed: int
    context: str  # the document
    question: str  # asked after the document
    answer_prefix: str  # start of the answer sentence, for base models
    answers: tuple[str, ...]  # the items to find
    metric: str  # "contains" | "recall" | "exact"
    distractors: tuple[str, ...]  # values planted in the context that are NOT the answer
    instruction: str  # the line before the document
    hint: str  # how to answer, for chat models ("Answer with the number only.")
    max_tokens: int  # output tokens the answer needs
    prompt_tokens: int = 0  # the final prompt as count_tokens counted it (0 while measuring)

    @property
    def uid(self) -> str:
        depth = "-" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}/{self.haystack}/{self.target_tokens}/{depth}/{self.seed}"

    def user_message(self) -> str:
        return f"{self.instruction}\n\n{self.context}\n\nQuestion: {self.question} {self.hint}"

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.user_message()}]

    def completion_prompt(self) -> str:
        """Same text as the chat turn, but it ends in the start of the answer for the model to continue."""
        return f"{self.instruction}\n\n{self.context}\n\nQuestion: {self.question}\nAnswer: {self.answer_prefix}"


@dataclass(frozen=True)
class TaskPlan:
    """What a task builder fixes before the length search: everything but the context's size."""

    render: Callable[[int, int], str]  # (full filler units, pieces of the next unit) -> context
    unit_pieces: Callable[[int], int] | None  # pieces in unit n, for the top-up; None: units are fine enough
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str
    instruction: str
    hint: str
    max_tokens: int
    distractors: tuple[str, ...] = ()
    unique: tuple[str, ...] = ()  # must occur exactly once in the context (checked after the search)


TaskBuilder = Callable[[str, float | None, int, int], TaskPlan]  # (haystack, depth, seed, target_tokens)


def sample_seed(base_seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one cell of a grid, e.g. ``sample_seed(0, "vt", "prose", 4096, 0.5)``."""
    key = "/".join([str(base_seed), *(str(part) for part in parts)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def nearest(offsets: list[int], where: float) -> int:
    """Index of the value in sorted ``offsets`` closest to ``where``."""
    i = bisect_left(offsets, where)
    if i == len(offsets) or (i > 0 and where - offsets[i - 1] <= offsets[i] - where):
        return i - 1
    return i


class Document:
    """Filler units with needles at relative depths; with ``facts``, every few units carry a fact too."""

    def __init__(
        self,
        haystack: str,
        seed: int,
        needles: list[tuple[float, str]],
        facts: Callable[[int], str] | None = None,
        fact_every: int = 0,
    ) -> None:
        self.stream = FillerStream(haystack, random.Random(sample_seed(seed, "filler", haystack)))
        self.separator = separator(haystack)
        self.needles = needles
        self.facts = facts
        self.fact_every = fact_every

    def unit(self, index: int) -> str:
        # A fact rides with the unit before it, so a top-up can take part of it too.
        text = self.stream.unit(index)
        if self.facts is not None and (index + 1) % self.fact_every == 0:
            text += self.separator + self.facts((index + 1) // self.fact_every - 1)
        return text

    def render(self, units: int, top_up_pieces: int) -> str:
        body = [self.unit(i) for i in range(units)]
        if top_up_pieces:
            pieces = list(PIECE.finditer(self.unit(units)))
            body.append(self.unit(units)[: pieces[top_up_pieces - 1].end()])
        # Depth is a share of the text, not of the units: records' lines and prose sentences vary in length.
        offsets = list(accumulate((len(unit) + len(self.separator) for unit in body), initial=0))
        at: dict[int, list[str]] = {}
        for depth, text in self.needles:
            at.setdefault(nearest(offsets, depth * offsets[-1]), []).append(text)
        out: list[str] = []
        for i in range(len(body) + 1):
            out.extend(at.get(i, ()))
            if i < len(body):
                out.append(body[i])
        return self.separator.join(out)

    def unit_pieces(self, units: int) -> int:
        return len(PIECE.findall(self.unit(units)))


# ---- needle values and keys ---------------------------------------------------------------------
def make_value(rng: random.Random, kind: str, taken: set[str]) -> str:
    """A fresh value of ``kind``: 7-digit number, 4x4-digit code or a word no haystack contains."""
    while True:
        if kind == "number":
            value = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "code":
            value = "-".join(f"{rng.randrange(10_000):04d}" for _ in range(4))
        else:
            value = rng.choice(VALUE_WORDS)
        if value not in taken:
            taken.add(value)
            return value


def other_depth(rng: random.Random, depth: float) -> float:
    """A seeded depth away from ``depth``, so a distractor does not sit right next to the target."""
    while True:
        other = rng.random()
        if abs(other - depth) >= 0.05:
            return other


def needle_text(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def niah_instruction(kind: str) -> str:
    return (
        f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind}s afterwards."
    )


def join_keys(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + " and " + keys[-1]


def niah(haystack: str, depth: float, seed: int, variant: str) -> TaskPlan:
    rng = random.Random(seed)
    kind = rng.choice(VALUE_KINDS)
    keys = rng.sample(PLACES, NEEDLE_COUNT)
    taken: set[str] = set()
    values = [make_value(rng, kind, taken) for _ in range(NEEDLE_COUNT)]
    depths = [depth, *(other_depth(rng, depth) for _ in range(NEEDLE_COUNT - 1))]
    many = f"Answer with the {kind}s only, separated by commas."
    if variant == "single":
        needles = [(depth, needle_text(kind, keys[0], values[0]))]
        answers, distractors, hint = (values[0],), (), f"Answer with the {kind} only."
    elif variant == "multikey":
        needles = [(d, needle_text(kind, k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
        answers, distractors, hint = (values[0],), tuple(values[1:]), f"Answer with the {kind} only."
    elif variant == "multivalue":
        needles = [(d, needle_text(kind, keys[0], v)) for d, v in zip(depths, values, strict=True)]
        answers, distractors, hint = tuple(values), (), many
    else:
        needles = [(d, needle_text(kind, k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
        answers, distractors, hint = tuple(values), (), many
    if variant in ("single", "multikey"):
        question = f"What is the special magic {kind} for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {keys[0]} mentioned in the provided text is"
    else:
        asked = keys[0] if variant == "multivalue" else join_keys(keys)
        question = f"What are all the special magic {kind}s for {asked} mentioned in the provided text?"
        prefix = f"The special magic {kind}s for {asked} mentioned in the provided text are"
    document = Document(haystack, seed, needles)
    return TaskPlan(
        render=document.render,
        unit_pieces=document.unit_pieces,
        question=question,
        answer_prefix=prefix,
        answers=answers,
        metric="contains" if variant in ("single", "multikey") else "recall",
        instruction=niah_instruction(kind),
        hint=hint,
        max_tokens=48 if variant in ("single", "multikey") else 128,
        distractors=distractors,
        unique=answers + distractors,
    )


def niah_task(variant: str) -> TaskBuilder:
    """The builder of one needle variant (single, multikey, multivalue, multiquery)."""

    def build(haystack: str, depth: float | None, seed: int, target_tokens: int) -> TaskPlan:
        assert depth is not None
        return niah(haystack, depth, seed, variant)

    return build


# ---- variable tracking --------------------------------------------------------------------------
VT_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # consonants only: a name can never be a word of the filler


def vt(haystack: str, depth: float | None, seed: int, target_tokens: int) -> TaskPlan:
    assert depth is not None
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < 2 * (VT_HOPS + 1):
        name = "".join(rng.choice(VT_LETTERS) for _ in range(5))
        if name not in names:
            names.append(name)
    chain, other = names[: VT_HOPS + 1], names[VT_HOPS + 1 :]
    value, other_value = rng.sample(range(100_000, 1_000_000), 2)

    def statements(names: list[str], value: int) -> list[str]:
        return [f"VAR {names[0]} = {value}.", *(f"VAR {b} = VAR {a}." for a, b in pairwise(names))]

    # The chain reads forwards: the assignment at depth, each hop later in the text.
    depths = [depth, *sorted(rng.uniform(depth, 1.0) for _ in range(VT_HOPS))]
    other_depths = sorted(rng.random() for _ in range(VT_HOPS + 1))
    needles = [
        *zip(depths, statements(chain, value), strict=True),
        *zip(other_depths, statements(other, other_value), strict=True),
    ]
    document = Document(haystack, seed, needles)
    count = VT_HOPS + 1
    return TaskPlan(
        render=document.render,
        unit_pieces=document.unit_pieces,
        question=f"Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(
            f"According to the chain(s) of variable assignment in the text above, {count} variables are "
            f"assigned the value {value}, they are:"
        ),
        answers=tuple(chain),
        metric="recall",
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        hint="Answer with the variable names only, separated by commas.",
        max_tokens=64,
        distractors=tuple(other),
    )


# ---- common words extraction --------------------------------------------------------------------
CWE_CONSONANTS = "bdfgklmnprstvz"
CWE_VOWELS = "aeiou"


class WordStream:
    """Endless distinct pronounceable pseudo-words ("ravotek"), seeded, grown in fixed blocks."""

    BLOCK = 64

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words: list[str] = []
        self.seen: set[str] = set()

    def make(self) -> str:
        syllables = "".join(
            self.rng.choice(CWE_CONSONANTS) + self.rng.choice(CWE_VOWELS) for _ in range(self.rng.randint(2, 3))
        )
        return syllables + (self.rng.choice("nrslk") if self.rng.random() < 0.5 else "")

    def take(self, count: int) -> list[str]:
        while len(self.words) < count:
            goal = len(self.words) + self.BLOCK
            while len(self.words) < goal:
                word = self.make()
                if word not in self.seen:
                    self.seen.add(word)
                    self.words.append(word)
        return self.words[:count]


def cwe(haystack: str, depth: float | None, seed: int, target_tokens: int) -> TaskPlan:
    # More repeats of the common words in longer lists; always well above the rare words' 3.
    repeats = min(30, max(10, target_tokens // 200))
    words = WordStream(random.Random(seed))
    common = words.take(CWE_COMMON)

    def render(rare_entries: int, top_up_pieces: int) -> str:
        rare = words.take(CWE_COMMON + math.ceil(rare_entries / CWE_RARE_REPEATS))[CWE_COMMON:]
        entries = [*(w for w in common for _ in range(repeats)), *(w for w in rare for _ in range(CWE_RARE_REPEATS))]
        entries = entries[: CWE_COMMON * repeats + rare_entries]
        random.Random(sample_seed(seed, "cwe-order", rare_entries)).shuffle(entries)
        return " ".join(f"{i}. {word}" for i, word in enumerate(entries, 1))

    return TaskPlan(
        render=render,
        unit_pieces=None,  # one list entry is a few tokens: fine enough without a top-up
        question=f"What are the {CWE_COMMON} most common words in the above list?",
        answer_prefix=f"The top {CWE_COMMON} words that appear most often in the list are:",
        answers=tuple(common),
        metric="recall",
        instruction=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        ),
        hint=f"Answer with the {CWE_COMMON} words only, separated by commas.",
        max_tokens=128,
    )


# ---- QA over synthetic facts --------------------------------------------------------------------
COMPANY_ADJECTIVES = (
    "Cobalt", "Amber", "Crimson", "Northern", "Golden", "Quiet", "Royal", "Hidden", "Swift", "Ivory",
    "Scarlet", "Emerald", "Western", "Lucky", "Bright", "Silent", "Grand", "Misty", "Iron", "Velvet",
)  # fmt: skip
COMPANY_NOUNS = (
    "Lantern", "Anchor", "Falcon", "Kettle", "Orchard", "Beacon", "Quill", "Thimble", "Saddle", "Ember",
    "Lattice", "Prism", "Harp", "Bridge", "Sparrow", "Tulip", "Compass", "Barrel", "Loom", "Cedar",
)  # fmt: skip
COMPANY_KINDS = ("Company", "Works", "Trading House", "Press", "Foundry", "Guild", "Cooperative", "Studio")
FIRST_NAMES = (
    "Marta", "Jonas", "Ingrid", "Tomas", "Amara", "Kenji", "Lucia", "Farid", "Helena", "Oskar",
    "Priya", "Mateo", "Sanna", "Idris", "Clara", "Rafael", "Noor", "Viktor", "Elena", "Tariq",
)  # fmt: skip
LAST_NAMES = (
    "Velasquez", "Lindqvist", "Okafor", "Brennan", "Takeda", "Moreau", "Haddad", "Novak", "Castellano", "Fischer",
    "Adeyemi", "Kowalski", "Sorensen", "Mendes", "Iversen", "Petrov", "Rahman", "Duarte", "Keller", "Nakamura",
)  # fmt: skip
QA_YEARS = (1900, 2019)  # records' dates are 2024 and never form another 4-digit group in this range
QA_FACT_EVERY = 4  # one distractor fact after every 4 filler units
QA_ASKS = ("year", "founder", "city")


@dataclass(frozen=True)
class Fact:
    company: str
    year: str
    founder: str
    city: str

    def sentence(self, shape: int) -> str:
        if shape == 0:
            return f"The {self.company} was founded in {self.year} by {self.founder} in {self.city}."
        return f"{self.founder} founded the {self.company} in {self.city} in {self.year}."


def make_fact(rng: random.Random) -> Fact:
    company = f"{rng.choice(COMPANY_ADJECTIVES)} {rng.choice(COMPANY_NOUNS)} {rng.choice(COMPANY_KINDS)}"
    founder = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    return Fact(company, str(rng.randint(*QA_YEARS)), founder, rng.choice(PLACES))


class FactStream:
    """Distractor facts, seeded and grown in fixed blocks, sharing nothing with the asked fact."""

    BLOCK = 32

    def __init__(self, rng: random.Random, asked: Fact) -> None:
        self.rng = rng
        self.asked = asked
        self.sentences: list[str] = []

    def __call__(self, index: int) -> str:
        while len(self.sentences) <= index:
            goal = len(self.sentences) + self.BLOCK
            while len(self.sentences) < goal:
                fact = make_fact(self.rng)
                a = self.asked
                if a.company == fact.company or a.year == fact.year or a.founder == fact.founder or a.city == fact.city:
                    continue
                self.sentences.append(fact.sentence(self.rng.randrange(2)))
        return self.sentences[index]


def qa(haystack: str, depth: float | None, seed: int, target_tokens: int) -> TaskPlan:
    assert depth is not None
    rng = random.Random(seed)
    fact = make_fact(rng)
    ask = rng.choice(QA_ASKS)
    facts = FactStream(random.Random(sample_seed(seed, "facts")), fact)
    document = Document(haystack, seed, [(depth, fact.sentence(rng.randrange(2)))], facts, QA_FACT_EVERY)
    company = fact.company
    question, prefix, answer, hint = {
        "year": (f"In which year was the {company} founded?", f"The {company} was founded in the year", fact.year,
                 "Answer with the year only."),
        "founder": (f"Who founded the {company}?", f"The {company} was founded by", fact.founder,
                    "Answer with the founder's full name only."),
        "city": (f"In which city was the {company} founded?", f"The {company} was founded in the city of", fact.city,
                 "Answer with the city only."),
    }[ask]  # fmt: skip
    return TaskPlan(
        render=document.render,
        unit_pieces=document.unit_pieces,
        question=question,
        answer_prefix=prefix,
        answers=(answer,),
        metric="contains",
        instruction="Answer the question based on the facts in the following text.",
        hint=hint,
        max_tokens=32,
        unique=(answer, company),
    )


TASKS: dict[str, TaskBuilder] = {
    "niah_single": niah_task("single"),
    "niah_multikey": niah_task("multikey"),
    "niah_multivalue": niah_task("multivalue"),
    "niah_multiquery": niah_task("multiquery"),
    "vt": vt,
    "cwe": cwe,
    "qa": qa,
}


# ---- sizing -------------------------------------------------------------------------------------
def largest_fitting(
    measure: Callable[[int], int],
    target: int,
    low: int,
    low_count: int,
    high: int | None = None,
    high_count: int = 0,
    guess: int = 16,
) -> tuple[int, int, int]:
    """Largest n with ``measure(n) <= target``, given ``measure(low) == low_count <= target``.

    Returns (n, measure(n), measure(n + 1) or an estimate). Counts grow about linearly in n, so it
    extrapolates to bracket the target, then interpolates, bisecting after any step that fails to
    halve the bracket: O(log n) calls, and usually a handful.
    """
    base, base_count = low, low_count
    n = max(low + 1, guess)
    while high is None:
        count = measure(n)
        if count > target:
            high, high_count = n, count
            break
        low, low_count = n, count
        per_unit = max((count - base_count) / (n - base), 1e-6)
        estimate = n + (target - count) / per_unit
        n = max(n + 1, min(8 * n, math.ceil(estimate * 1.02) + 1))  # aim just past the target to bracket it
    bisect = False
    while high - low > 1:
        width = high - low
        if bisect:
            n = (low + high) // 2
        else:
            share = (target - low_count) / max(high_count - low_count, 1)
            n = min(max(low + int(share * width), low + 1), high - 1)
        count = measure(n)
        if count <= target:
            low, low_count = n, count
        else:
            high, high_count = n, count
        bisect = not bisect and 2 * (high - low) > width
    return low, low_count, high_count


def check_depth(task: str, depth: float | None) -> float | None:
    if task in TASKS_WITHOUT_DEPTH:
        if depth is not None:
            raise ValueError(f"task {task!r} has no depth: pass depth=None")
        return None
    if depth is None or not isinstance(depth, int | float) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"task {task!r} needs a depth in [0, 1], got {depth!r}")
    return float(depth)


def build_sample(
    task: str,
    haystack: str,
    target_tokens: int,
    depth: float | None,
    seed: int,
    count_tokens: Callable[[Sample], int],
) -> Sample:
    """A ``task`` sample whose prompt, as ``count_tokens`` counts it, is within 2% under ``target_tokens``.

    ``count_tokens`` sees the whole Sample and counts the prompt exactly as the caller will send it
    (chat or completion, its own tokenizer); it is called O(log n) times.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    check_haystack(haystack)
    if not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    depth = check_depth(task, depth)
    plan = TASKS[task](haystack, depth, seed, target_tokens)
    measured: dict[tuple[int, int], tuple[Sample, int]] = {}

    def measure(units: int, top_up_pieces: int = 0) -> int:
        if (units, top_up_pieces) not in measured:
            sample = Sample(
                task=task,
                haystack=haystack,
                target_tokens=target_tokens,
                depth=depth,
                seed=seed,
                context=plan.render(units, top_up_pieces),
                question=plan.question,
                answer_prefix=plan.answer_prefix,
                answers=plan.answers,
                metric=plan.metric,
                distractors=plan.distractors,
                instruction=plan.instruction,
                hint=plan.hint,
                max_tokens=plan.max_tokens,
            )
            measured[units, top_up_pieces] = sample, count_tokens(sample)
        return measured[units, top_up_pieces][1]

    floor = measure(0)
    if floor > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is below the {floor} tokens {task} needs with no filler")
    units, count, next_count = largest_fitting(measure, target_tokens, 0, floor)
    top_up = 0
    if plan.unit_pieces is not None and count < target_tokens * (1 - TOP_UP_GAP):
        # The next whole unit overshoots: add as many of its pieces as fit.
        top_up, count, _ = largest_fitting(
            lambda words: measure(units, words), target_tokens, 0, count, plan.unit_pieces(units), next_count
        )
    sample = replace(measured[units, top_up][0], prompt_tokens=count)
    for item in plan.unique:
        if count_occurrences(item, sample.context) != 1:  # cannot happen by construction: a bug if it does
            raise RuntimeError(f"{sample.uid}: {item!r} occurs {count_occurrences(item, sample.context)} times")
    return sample
