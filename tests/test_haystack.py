"""Needle-in-a-haystack prompts: lengths, depths, variety, determinism, the answer checker."""

from __future__ import annotations

import random

import pytest

from evals.needles import Needle, approx_tokens, build_case, depths, make_needle


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
