"""Needle-in-a-haystack prompts: lengths, depths, variety, determinism, the answer checker; and the
eval suite's haystack kinds (evals/haystacks.py): seeded streams, vocabularies, no hidden values."""

from __future__ import annotations

import hashlib
import random
import re
import sys

import pytest

from contract.needles import ANIMALS, PLACES, WORDS, Needle, approx_tokens, build_case, depths, make_needle
from evals.haystacks import (
    EMAIL_SUBJECTS,
    HAYSTACKS,
    HELDOUT_HAYSTACKS,
    RECORD_CITIES,
    SIGN_OFFS,
    SPEAKERS,
    TUNING_HAYSTACKS,
    FillerStream,
    haystack_units,
    separator,
    vocabulary,
)
from evals.tasks import FIRST_NAMES, LAST_NAMES, VALUE_WORDS, build_sample
from tests.fixtures.digit_runs import assert_no_digit_run_reads_as_a_value


def test_case_lands_at_or_just_under_the_target(count_tokens) -> None:
    for target in (500, 2000):
        case = build_case(target, depth=0.5, seed=3, count_tokens=count_tokens)
        tokens = count_tokens(case.user_message())
        assert target - 60 <= tokens <= target


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_the_requested_depth(depth) -> None:
    case = build_case(3000, depth=depth, seed=4)
    assert case.document.count(case.needle.sentence) == 1
    where = case.document.index(case.needle.sentence) / len(case.document)
    assert abs(where - depth) < 0.05
    assert case.needle.question in case.user_message()
    assert case.needle.question in case.completion_prompt()


def test_same_seed_same_case_other_seed_other_case() -> None:
    assert build_case(800, 0.3, seed=9) == build_case(800, 0.3, seed=9)
    assert build_case(800, 0.3, seed=9).document != build_case(800, 0.3, seed=10).document


def test_needles_vary_in_shape_key_and_value() -> None:
    needles = [make_needle(random.Random(seed)) for seed in range(200)]
    shapes = {n.sentence.split()[1] for n in needles}  # "The special magic...", "The password to..."
    assert shapes >= {"special", "password", "train", "mascot"}
    assert len({n.answer for n in needles}) > 100
    for needle in needles:
        assert needle.answer in needle.sentence
        assert needle.answer not in needle.question


def test_filler_never_contains_the_answer() -> None:
    for seed in range(20):
        case = build_case(1500, depth=0.5, seed=seed)
        assert case.document.count(case.needle.answer) == case.needle.sentence.count(case.needle.answer)


def test_answer_checker() -> None:
    number = Needle("The special magic number for Oslo is 4412345.", "q", "4412345")
    assert number.found_in("It is 4,412,345.")
    assert number.found_in("4 412 345")
    assert not number.found_in("441234")
    word = Needle("The password to open the red door is falcon.", "q", "falcon")
    assert word.found_in("The password is FALCON.")
    assert not word.found_in("The password is eagle.")


def test_depths_and_validation() -> None:
    assert depths(1) == [0.5]
    assert depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        build_case(500, depth=1.5, seed=0)
    assert approx_tokens("") == 1


# ---- the eval suite's haystack kinds -------------------------------------------------------------
def words_of(units: list[str]) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(units).lower()))


def test_kinds_split_into_tuning_and_heldout_families() -> None:
    assert HAYSTACKS == ("noise", "prose", "records", "dialogue", "emails", "code")
    assert TUNING_HAYSTACKS == ("noise", "prose", "records")
    assert HELDOUT_HAYSTACKS == ("dialogue", "emails", "code")
    assert {k: separator(k) for k in HELDOUT_HAYSTACKS} == {"dialogue": "\n", "emails": "\n", "code": "\n"}
    with pytest.raises(ValueError, match="noise, prose, records, dialogue, emails, code"):
        FillerStream("chat", random.Random(0))


@pytest.mark.parametrize("kind", HAYSTACKS)
def test_every_kind_streams_in_seeded_fixed_blocks(kind: str) -> None:
    stream = FillerStream(kind, random.Random(5))
    head = stream.take(37)
    rng = random.Random(5)
    blocks = [u for _ in range(4) for u in haystack_units(kind, rng, FillerStream.BLOCK)]
    assert stream.take(4 * FillerStream.BLOCK) == blocks  # its content depends on the seed alone
    assert head == blocks[:37] and stream.unit(130) == blocks[130]
    assert FillerStream(kind, random.Random(5)).take(200) == blocks[:200]
    if kind != "noise":
        assert FillerStream(kind, random.Random(6)).take(200) != blocks[:200]


@pytest.mark.parametrize("kind", HAYSTACKS)
def test_every_kind_stays_in_its_vocabulary_and_keeps_the_value_words_out(kind: str) -> None:
    units = FillerStream(kind, random.Random(1)).take(1200)
    assert all(u.strip() for u in units)
    if separator(kind) == "\n":
        assert not any("\n" in u for u in units)  # one line per unit
    assert words_of(units) <= vocabulary(kind)
    # No kind may contain a needle word: VALUE_WORDS keeps all of them, so a new kind leaves the
    # word values (and with them every sample of the other kinds) as they were.
    assert not vocabulary(kind) & {w.lower() for w in (*WORDS, *ANIMALS, *PLACES)}
    assert tuple(WORDS) == VALUE_WORDS


@pytest.mark.parametrize("kind", HELDOUT_HAYSTACKS)
def test_heldout_kinds_cannot_hide_a_needle_value(kind: str) -> None:
    text = "\n".join(FillerStream(kind, random.Random(7)).take(6000))
    assert re.search(r"\d", text)  # they do carry small numbers
    # Joined across any separator a value might be written with, no run of digit groups reads as a
    # 7-digit number, a 16-digit code, or a qa year (1900-2019).
    assert_no_digit_run_reads_as_a_value(text, r"\s,.:\-\u2013")
    # No place at all (neither a needle key nor a records city), no qa founder's name, none of the
    # needle sentences' own words.
    names = {w.lower() for w in (*PLACES, *RECORD_CITIES, *FIRST_NAMES, *LAST_NAMES)}
    assert not vocabulary(kind) & (names | {"magic", "special", "password", "platform", "mascot", "founded"})


def test_dialogue_is_a_varied_chat_transcript() -> None:
    turns = FillerStream("dialogue", random.Random(3)).take(600)
    speakers = []
    for turn in turns:
        speaker, utterance = turn.split(": ", 1)
        assert speaker in SPEAKERS and re.fullmatch(r"[A-Z].*[.?!]", utterance), turn
        speakers.append(speaker)
    assert len(set(speakers)) == len(SPEAKERS)
    assert len(set(turns)) > 0.85 * len(turns)  # composed, not a few turns on repeat
    assert len({t.split(": ", 1)[1] for t in turns}) > 0.5 * len(turns)  # 339 of 600 at this seed


def test_emails_follow_each_other_line_by_line() -> None:
    units = FillerStream("emails", random.Random(3)).take(10 * FillerStream.BLOCK)
    whole = 0
    # Each block of the stream is its own run of emails: only a block's last one may be cut short.
    for start in range(0, len(units), FillerStream.BLOCK):
        lines = units[start : start + FillerStream.BLOCK]
        i = 0
        while i < len(lines):
            sender = re.fullmatch(r"From: ([A-Z][a-z]+) <([a-z]+)@example\.org>", lines[i])
            assert sender and sender[1] in SPEAKERS and sender[2] == sender[1].lower(), lines[i]
            rest = lines[i + 1 :]
            if rest:
                assert rest[0].startswith("Subject: ") and rest[0][9:].startswith(EMAIL_SUBJECTS), rest[0]
            end = next((j for j, line in enumerate(rest) if line in SIGN_OFFS), len(rest))
            body = rest[1:end]
            assert all(re.fullmatch(r"[A-Z][^:]*[.?]", line) for line in body), body
            assert len(body) <= 3 and (body or end == len(rest))
            if end + 1 >= len(rest):  # cut at the block's end
                assert i + 1 + len(rest) == len(lines)
                break
            assert rest[end + 1] == sender[1]  # the sign-off, then the sender's name
            whole += 1
            i += end + 3
    assert whole > 60
    assert len(set(units)) > 0.3 * len(units)


# The held-out families were first measured (bench/results/eval_smollm2_heldout) with exactly this
# text: a change to their generators must be deliberate, and that measurement rerun.
HELDOUT_FINGERPRINTS = {
    "dialogue": (
        "Goran: Can we move the sync about the onboarding guide to tonight?",
        "2d21c7bd527181cf",
    ),
    "emails": ("From: Goran <goran@example.org>", "703a51999c92b755"),
    # The standard library's source: pinned for the interpreter the measurements ran on.
    "code": ('            if homedir[:1] == "~":', "6778ad1a2eda99af"),
}
CODE_PINNED_ON = (3, 11, 7)


@pytest.mark.parametrize("kind", HELDOUT_HAYSTACKS)
def test_heldout_text_is_pinned(kind: str) -> None:
    if kind == "code" and sys.version_info[:3] != CODE_PINNED_ON:
        pytest.skip(f"the code haystack is pinned on Python {CODE_PINNED_ON}'s standard library")
    units = FillerStream(kind, random.Random(0)).take(4 * FillerStream.BLOCK)
    first, digest = HELDOUT_FINGERPRINTS[kind]
    assert units[0] == first
    assert hashlib.sha256("\n".join(units).encode()).hexdigest()[:16] == digest


@pytest.mark.parametrize("kind", HELDOUT_HAYSTACKS)
def test_heldout_kinds_build_prompts_with_the_needle_on_its_own_line(kind: str) -> None:
    sample = build_sample("niah_single", kind, 1024, 0.5, 3, lambda s: approx_tokens(s.user_message()))
    lines = sample.context.split("\n")
    needle = [line for line in lines if "special magic" in line]
    assert len(needle) == 1 and sample.answers[0] in needle[0]
    assert len(lines) > 30
    assert 0.3 < lines.index(needle[0]) / len(lines) < 0.7
