"""RULER-style eval tasks: sizes, answers planted exactly once, determinism, and the scorer.

A stand-in tokenizer (words and punctuation marks) keeps these fast; one test sizes prompts
with the real SmolLM2 tokenizer through the session ``engine``.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

import pytest

from contract.needles import ANIMALS, PLACES, TOPICS
from evals.haystacks import (
    HAYSTACKS,
    HELDOUT_HAYSTACKS,
    NOISE_SENTENCES,
    RECORD_CITIES,
    TUNING_HAYSTACKS,
    FillerStream,
    code_lines,
    haystack_units,
    records,
    source_lines,
    vocabulary,
)
from evals.scoring import answers_kept_whole, count_occurrences, item_found, normalize, score
from evals.tasks import (
    FIRST_NAMES,
    LAST_NAMES,
    TASKS,
    TASKS_WITHOUT_DEPTH,
    VALUE_WORDS,
    Sample,
    build_sample,
    sample_seed,
)
from tests.fixtures.digit_runs import assert_no_digit_run_reads_as_a_value

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "qa")
TARGETS = (1024, 4096, 16384, 32768)


def stand_in_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def chat_tokens(sample: Sample) -> int:
    return sum(stand_in_tokens(m["content"]) for m in sample.chat_messages())


def completion_tokens(sample: Sample) -> int:
    return stand_in_tokens(sample.completion_prompt())


def depth_for(task: str) -> float | None:
    return None if task in TASKS_WITHOUT_DEPTH else 0.4


def build(task: str, haystack: str, target: int = 4096, seed: int = 1, depth: float | None = 0.4) -> Sample:
    return build_sample(task, haystack, target, None if task in TASKS_WITHOUT_DEPTH else depth, seed, chat_tokens)


# ---- sizing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_lands_within_2_percent_under_the_target(task: str, haystack: str) -> None:
    for style, count in (("chat", chat_tokens), ("completion", completion_tokens)):
        for target in TARGETS:
            sample = build_sample(task, haystack, target, depth_for(task), 5, count)
            tokens = count(sample)
            assert 0.98 * target <= tokens <= target, (style, target, tokens)
            assert sample.prompt_tokens == tokens


def test_few_calls_to_count_tokens() -> None:
    calls: list[int] = []

    def counting(sample: Sample) -> int:
        calls.append(1)
        return chat_tokens(sample)

    for task in TASKS:
        for haystack in HAYSTACKS:
            calls.clear()
            build_sample(task, haystack, 32768, depth_for(task), 2, counting)
            assert len(calls) <= 20, (task, haystack, len(calls))


def test_real_tokenizer_lands_within_2_percent(engine) -> None:
    def chat(sample: Sample) -> int:
        return len(engine.encode_chat(sample.chat_messages()))

    def completion(sample: Sample) -> int:
        return len(engine.encode_prompt(sample.completion_prompt()))

    for task, haystack, count in (("niah_multikey", "prose", chat), ("vt", "records", completion)):
        for target in (1024, 4096):
            sample = build_sample(task, haystack, target, 0.5, 11, count)
            assert 0.98 * target <= count(sample) <= target, (task, target, count(sample))


# ---- answers in the context ---------------------------------------------------------------------
@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_each_answer_occurs_exactly_once(task: str, haystack: str) -> None:
    for seed in range(6):
        for depth in (0.0, 0.5, 1.0):
            sample = build(task, haystack, target=2048 if seed % 2 else 8192, seed=seed, depth=depth)
            for answer in sample.answers:
                assert count_occurrences(answer, sample.context) == 1, (sample.uid, answer)
                assert sample.context.count(answer) == 1, (sample.uid, answer)
                assert answer not in sample.question
            expected = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 4, "qa": 1}
            assert len(set(sample.answers)) == expected[task]


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_multikey_distractors_are_other_values_each_planted_once(haystack: str) -> None:
    for seed in range(6):
        sample = build("niah_multikey", haystack, seed=seed)
        (answer,) = sample.answers
        assert len(sample.distractors) == 3
        assert answer not in sample.distractors
        assert len(set(sample.distractors)) == 3
        for value in sample.distractors:
            assert count_occurrences(value, sample.context) == 1
            assert len(value) == len(answer)  # same shape as the target
        keys = re.findall(r"special magic \w+ for (\w+) is:", sample.context)
        assert len(set(keys)) == 4  # different keys


def test_values_come_in_all_three_shapes() -> None:
    shapes = set()
    for seed in range(30):
        (answer,) = build("niah_single", "prose", target=1024, seed=seed).answers
        if re.fullmatch(r"\d{7}", answer):
            shapes.add("number")
        elif re.fullmatch(r"\d{4}-\d{4}-\d{4}-\d{4}", answer):
            shapes.add("code")
        else:
            assert answer in VALUE_WORDS
            shapes.add("word")
    assert shapes == {"number", "code", "word"}


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_the_requested_depth(depth: float) -> None:
    sample = build("niah_single", "prose", target=8192, depth=depth)
    where = sample.context.index(sample.answers[0]) / len(sample.context)
    assert abs(where - depth) < 0.03


def resolve_variables(context: str) -> dict[str, int]:
    values: dict[str, int] = {}
    assigned = Counter()
    for name, number, source in re.findall(r"VAR ([A-Z]+) = (?:(\d+)|VAR ([A-Z]+))\.", context):
        assigned[name] += 1
        values[name] = int(number) if number else values[source]  # KeyError if a hop precedes its source
    assert set(assigned.values()) == {1}  # each variable assigned once
    return values


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_vt_chain_resolves_to_exactly_the_answers(haystack: str) -> None:
    for seed in range(6):
        sample = build("vt", haystack, seed=seed, depth=seed / 5)
        values = resolve_variables(sample.context)
        (value,) = {int(v) for v in re.findall(r"the value (\d+)", sample.question)}
        assert {name for name, v in values.items() if v == value} == set(sample.answers)
        assert len(sample.answers) == 5
        other = {name for name, v in values.items() if v != value}
        assert other == set(sample.distractors) and len(other) == 5
        assert sample.context.index(f"VAR {sample.answers[0]} = {value}.") / len(sample.context) == pytest.approx(
            seed / 5, abs=0.03
        )


def test_cwe_common_words_are_the_ten_most_frequent() -> None:
    for target in (1024, 8192):
        sample = build("cwe", "noise", target=target, seed=target)
        entries = re.findall(r"(\d+)\. (\w+)", sample.context)
        assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        assert len(sample.answers) == 10 and sample.depth is None
        least_common = min(counts[w] for w in sample.answers)
        assert least_common >= 10
        assert max(c for w, c in counts.items() if w not in sample.answers) <= 3
        assert {w for w, _ in counts.most_common(10)} == set(sample.answers)
    # cwe ignores the haystack kind
    assert build("cwe", "noise", seed=3).context == build("cwe", "records", seed=3).context


def test_qa_has_distractor_facts_of_the_same_shape() -> None:
    sample = build("qa", "prose", target=8192, seed=4)
    facts = re.findall(r"was founded in \d{4} by|founded the [A-Z]", sample.context)
    assert len(facts) > 50
    (answer,) = sample.answers
    assert count_occurrences(answer, sample.context) == 1
    assert sample.answer_prefix.startswith("The ") and "founded" in sample.answer_prefix


# ---- determinism, prompt shapes, validation -------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_sample_other_seed_other_sample(task: str) -> None:
    first = build(task, "records", target=2048, seed=21)
    assert first == build(task, "records", target=2048, seed=21)
    other = build(task, "records", target=2048, seed=22)
    assert other.context != first.context
    assert other.answers != first.answers


def test_sample_seed_is_stable_and_separates_cells() -> None:
    assert sample_seed(0, "vt", "prose", 4096, 0.5) == sample_seed(0, "vt", "prose", 4096, 0.5)
    assert sample_seed(0, "vt", "prose", 4096, 0.5) == 6789067766423514157  # sha256-based, not hash()
    seeds = {sample_seed(base, task, 4096) for base in range(3) for task in TASKS}
    assert len(seeds) == 3 * len(TASKS)


def test_prompt_shapes() -> None:
    sample = build("niah_single", "noise", target=1024, seed=8)
    assert sample.uid == "niah_single/noise/1024/0.4/8"
    assert build("cwe", "noise", target=1024, seed=8).uid == "cwe/noise/1024/-/8"
    (message,) = sample.chat_messages()
    assert message["role"] == "user"
    assert message["content"] == (
        f"{sample.instruction}\n\n{sample.context}\n\nQuestion: {sample.question} {sample.hint}"
    )
    assert sample.completion_prompt() == (
        f"{sample.instruction}\n\n{sample.context}\n\nQuestion: {sample.question}\nAnswer: {sample.answer_prefix}"
    )
    key = re.search(r"for (\w+) mentioned", sample.question).group(1)
    assert (
        sample.answer_prefix
        == f"The special magic {sample.hint.split()[3]} for {key} mentioned in the provided text is"
    )


def test_bad_arguments_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="niah_single, niah_multikey"):
        build_sample("niah", "prose", 1024, 0.5, 0, chat_tokens)
    with pytest.raises(ValueError, match="noise, prose, records, dialogue, emails"):
        build_sample("vt", "wiki", 1024, 0.5, 0, chat_tokens)
    for depth in (1.5, -0.1, None):
        with pytest.raises(ValueError, match=r"depth in \[0, 1\]"):
            build_sample("qa", "prose", 1024, depth, 0, chat_tokens)
    with pytest.raises(ValueError, match="no depth"):
        build_sample("cwe", "prose", 1024, 0.5, 0, chat_tokens)
    with pytest.raises(ValueError, match="below"):
        build_sample("niah_multiquery", "prose", 40, 0.5, 0, chat_tokens)


# ---- haystacks ----------------------------------------------------------------------------------
def test_haystack_kinds() -> None:
    noise = haystack_units("noise", random.Random(0), 12)
    assert noise[:5] == list(NOISE_SENTENCES) and noise[5] == "The grass is green."
    prose = haystack_units("prose", random.Random(0), 40)
    sentences = {s.lower() for topic in TOPICS.values() for s in topic}
    assert len(set(prose)) > 20 and all(any(s.lower().endswith(t[1:]) for t in sentences) for s in prose)
    assert all(set(re.findall(r"[a-z]+", s.lower())) <= vocabulary("prose") for s in prose)
    lines = records(random.Random(0), 400)
    assert any(
        re.fullmatch(r"2024-\d\d-\d\d \d\d:\d\d:\d\d [A-Z]+ [a-z]+-\d [A-Z]+ /v1/\w+/\d{5} \d{3} \d+ms", x)
        for x in lines
    )
    assert any(re.fullmatch(r"\| \d{5} \| [A-Z][a-z]+ \| [a-z]+ \| \d+\.\d\d \|", x) for x in lines)
    assert len(set(lines)) > 350
    stream = FillerStream("records", random.Random(4))
    assert stream.take(100)[:30] == FillerStream("records", random.Random(4)).take(30)


def test_records_cannot_hide_a_needle_value() -> None:
    text = "\n".join(records(random.Random(1), 20000))
    assert not re.search(r"\d{6}", text)  # no plain digit run as long as a 7-digit value
    # Joined across separators, no digit-group run concatenates to 7 or 16 digits, nor to a qa year.
    assert_no_digit_run_reads_as_a_value(text, r" \t,\-")
    assert not set(RECORD_CITIES) & set(PLACES)
    all_words = vocabulary("noise") | vocabulary("prose") | vocabulary("records")
    assert VALUE_WORDS and not set(VALUE_WORDS) & all_words
    assert "harbour" in all_words and "info" in all_words


@pytest.mark.parametrize("kind", HELDOUT_HAYSTACKS)
def test_heldout_haystacks_are_varied_seeded_and_cannot_hide_a_needle_value(kind: str) -> None:
    units = haystack_units(kind, random.Random(2), 3000)
    assert len(set(units)) > 300 and units[:50] == haystack_units(kind, random.Random(2), 50)
    assert units != haystack_units(kind, random.Random(3), 3000)
    text = "\n".join(units)
    assert not re.search(r"\d{3}", text)  # numbers below 100: no digit run a value or a year hides in
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert words <= vocabulary(kind)
    assert not words & {w.lower() for w in (*PLACES, *VALUE_WORDS, *ANIMALS, *FIRST_NAMES, *LAST_NAMES)}
    assert kind not in TUNING_HAYSTACKS and set(HAYSTACKS) == set(TUNING_HAYSTACKS) | set(HELDOUT_HAYSTACKS)
    if kind == "dialogue":
        assert all(re.fullmatch(r"[A-Z][a-z]+: [A-Z].*[.?!]", u) for u in units)
    elif kind == "code":
        # A stretch of the standard library's source (less the lines a value could hide in), in order.
        assert set(units) <= set(source_lines()) and sum(u.lstrip().startswith("def ") for u in units) > 50
        assert "\n".join(units[:200]) in "\n".join(code_lines() * 2)
    else:
        senders, subjects = sum(u.startswith("From: ") for u in units), sum(u.startswith("Subject: ") for u in units)
        assert senders - subjects in (0, 1) and subjects > 300  # the last email may be cut after its sender


# ---- scoring ------------------------------------------------------------------------------------
def fixture(answers: tuple[str, ...], metric: str, distractors: tuple[str, ...] = ()) -> Sample:
    return Sample(
        task="niah_multikey",
        haystack="prose",
        target_tokens=1024,
        depth=0.5,
        seed=0,
        context="",
        question="q",
        answer_prefix="p",
        answers=answers,
        metric=metric,
        distractors=distractors,
        instruction="i",
        hint="h",
        max_tokens=8,
    )


def test_normalize() -> None:
    assert normalize("  The  Sky\n is\tBLUE ") == "the sky is blue"


def test_item_found_digits_words_and_boundaries() -> None:
    assert item_found("4412345", "The number is 4412345.")
    assert item_found("4412345", "It is 4,412,345.")
    assert item_found("4412345", "4 412 345")
    assert not item_found("1234", "912345")  # not inside a longer digit run
    assert not item_found("1234", "12345")
    assert item_found("1234", "codes 1234, 5678")  # whole group in a list
    assert item_found("7391-2048-5562-0193", "7391 2048 5562 0193")
    assert item_found("7391-2048-5562-0193", "7391204855620193")
    assert item_found("7391-2048-5562-0193", "it's 7,391,2048-5562 0193!")
    assert not item_found("7391-2048-5562-0193", "7391-2048-5562-0194")
    assert item_found("falcon", "The word is FALCON.")
    assert not item_found("falcon", "falconry")
    assert item_found("Marta Velasquez", "founded by marta\nvelasquez in 1987")
    assert not item_found("Lima", "Limassol")


def test_score_metrics() -> None:
    contains = fixture(("4412345",), "contains", ("5523456",))
    assert score(contains, "The special magic number is 4412345.") == 1.0
    assert score(contains, "The special magic number is 5523456.") == 0.0
    assert score(contains, "44123456") == 0.0
    recall = fixture(("lantern", "orchid", "7391-2048-5562-0193", "QPRZK"), "recall")
    assert score(recall, "Lantern, qprzk and 7391 2048 5562 0193") == 0.75
    assert score(recall, "none") == 0.0
    exact = fixture(("Porto",), "exact")
    assert score(exact, "  porto.\nBecause it was.") == 1.0
    assert score(exact, "In Porto.") == 0.0
    assert score(exact, "") == 0.0
    with pytest.raises(ValueError, match="contains, recall, exact"):
        score(fixture(("x",), "f1"), "x")


def test_answers_kept_whole() -> None:
    sample = fixture(("7391-2048-5562-0193", "falcon"), "recall")
    assert answers_kept_whole(sample, ["... is: 7391-2048", "-5562-0193. And falcon"]) == 0.5
    assert answers_kept_whole(sample, ["is: 7391-2048-5562-0193.", "x"]) == 0.5
    assert answers_kept_whole(sample, ["is: 7391-2048-5562-0193.", "the falcon"]) == 1.0
    assert answers_kept_whole(sample, []) == 0.0


def test_every_task_scores_its_own_answers_full_and_noise_zero() -> None:
    scorers: dict[str, Callable[[Sample], str]] = {
        "contains": lambda s: f"{s.answer_prefix} {s.answers[0]}.",
        "recall": lambda s: ", ".join(s.answers),
    }
    for task in TASKS:
        sample = build(task, "prose", target=1024, seed=9)
        assert score(sample, scorers[sample.metric](sample)) == 1.0
        assert score(sample, "I do not know.") == 0.0
        assert answers_kept_whole(sample, [sample.context]) == 1.0
