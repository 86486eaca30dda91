"""Whole-span selection (compressors/units.py): exact budget, sorted, tail kept, units never split."""

from __future__ import annotations

import random

import pytest
import torch

from compressors.gemfilter import GemFilter, pick_indices
from compressors.units import MAX_UNIT_TOKENS, chunk_starts, pick_whole_units, word_starts


def random_units(rng: random.Random, n: int) -> torch.Tensor:
    """Unit starts with sizes 1..6, a third of them single tokens (as words are in real text)."""
    begins = torch.zeros(n, dtype=torch.bool)
    at = 0
    while at < n:
        begins[at] = True
        at += 1 if rng.random() < 0.35 else rng.randint(2, 6)
    return begins


def units_of(begins: torch.Tensor) -> list[list[int]]:
    out: list[list[int]] = []
    for i, start in enumerate(begins.tolist()):
        if start or not out:
            out.append([])
        out[-1].append(i)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_whole_units_exact_budget_sorted_tail_and_never_split(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(60, 500)
    begins = random_units(rng, n)
    scores = torch.tensor([rng.random() for _ in range(n)])
    keep = rng.randint(1, n // 2)
    tail = rng.choice([0, 8, 32])
    kept = pick_whole_units(scores, keep, tail, begins)
    assert len(kept) == keep
    assert kept == sorted(set(kept))
    assert set(range(n - min(tail, keep), n)) <= set(kept)
    kept_set = set(kept)
    units = units_of(begins)
    tail_unit = next(u for u in units if (n - min(tail, keep)) in u) if min(tail, keep) else None
    for unit in units:
        held = [i in kept_set for i in unit]
        if unit is tail_unit and n - unit[0] > keep:
            continue  # the tail's first unit did not fit whole: exactly the last `tail` tokens are kept
        assert all(held) or not any(held), (unit, held)


def test_best_units_first_and_a_high_digit_keeps_its_whole_number() -> None:
    # Units: [0] [1 2 3 4 5] [6] [7] [8 9] ; token 3 (inside the number) scores highest.
    begins = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    scores = torch.tensor([0.1, 0.2, 0.05, 0.9, 0.0, 0.0, 0.5, 0.4, 0.3, 0.0])
    assert pick_whole_units(scores, keep=6, tail=0, begins=begins) == [1, 2, 3, 4, 5, 6]
    # Token level would split that number: it keeps 3 and the other high tokens around it.
    assert pick_indices(scores, keep=6, kernel_size=1, tail=0) == [0, 1, 3, 6, 7, 8]


def test_tail_is_kept_from_its_first_unit_and_a_unit_that_cannot_fit_is_passed_over() -> None:
    begins = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)  # [0-2] [3] [4 5] [6-9]
    scores = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.8, 0.8, 0.0, 0.0, 0.0, 0.0])
    # tail=2 lands inside [6-9]: the whole unit (4 tokens) is protected; 2 slots left: [0-2] does not fit.
    assert pick_whole_units(scores, keep=6, tail=2, begins=begins) == [4, 5, 6, 7, 8, 9]


def test_when_no_whole_unit_fits_the_best_single_tokens_fill_the_budget() -> None:
    begins = chunk_starts(12, 3)  # four units of three
    scores = torch.tensor([0.0, 0.0, 0.0, 0.9, 0.8, 0.7, 0.1, 0.6, 0.1, 0.0, 0.0, 0.0])
    assert pick_whole_units(scores, keep=4, tail=0, begins=begins) == [3, 4, 5, 7]


def test_word_units_follow_whitespace_and_keep_a_code_with_its_dashes(engine) -> None:
    text = "The magic code for Oslo is 7391-2048-5562-0193. Then\n\nnext words here."
    ids = torch.tensor(engine.tokenizer(text)["input_ids"])
    units = [engine.tokenizer.decode(ids[u].tolist()) for u in units_of(word_starts(engine.tokenizer, ids))]
    assert " 7391-2048-5562-0193." in units
    assert units[:3] == ["The", " magic", " code"]
    assert all(len(u) <= MAX_UNIT_TOKENS * 8 for u in units)


def test_gemfilter_span_word_never_splits_a_word_on_a_real_prompt(loaded_model, engine) -> None:
    from evals.tasks import build_sample

    sample = build_sample("niah_single", "records", 900, 0.5, 11, lambda s: len(engine.encode_chat(s.chat_messages())))
    ids = torch.tensor([engine.encode_chat(sample.chat_messages())])
    selection = GemFilter(budget=200, span="word", payoff_ratio=0).select(
        loaded_model.model, ids, 1024, engine.tokenizer
    )
    kept = set(selection.kept_indices)
    assert len(kept) == 200
    assert selection.details["span"] == "word"
    begins = word_starts(engine.tokenizer, ids)
    tail_start = ids.shape[1] - 32
    for unit in units_of(begins):
        if unit[-1] >= tail_start:
            continue  # the protected tail
        held = [i in kept for i in unit]
        assert all(held) or not any(held), engine.tokenizer.decode(ids[0, unit].tolist())


def test_span_word_without_a_tokenizer_is_an_internal_error(loaded_model) -> None:
    with pytest.raises(RuntimeError, match="needs the tokenizer"):
        GemFilter(budget=8, span="word", payoff_ratio=0).select(loaded_model.model, torch.arange(40).view(1, -1), 8)


def test_bad_span_knobs_are_400s(engine) -> None:
    from server.engine.types import CompressionSpec, GenerationRequest, RequestError

    for knobs, param in (({"span": "sentence"}, "compression.span"), ({"chunk_size": 0}, "compression.chunk_size")):
        request = GenerationRequest(prompt_ids=[1, 2, 3], compression=CompressionSpec(method="gemfilter", knobs=knobs))
        with pytest.raises(RequestError) as caught:
            engine.check_request(request)
        assert caught.value.param == param
