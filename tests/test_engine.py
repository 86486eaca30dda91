"""The HF engine on the real model: request checks, decoding, streaming, stop strings, sampling."""

from __future__ import annotations

import pytest

from server.engine.detokenize import IncrementalDetokenizer
from server.engine.types import (
    CompressionSpec,
    GenerationRequest,
    GenerationResult,
    RequestError,
    SamplingParams,
    TokenDelta,
)

QUESTION = "Name three colours of the rainbow."


def request(prompt_ids: list[int], method: str = "none", knobs: dict | None = None, **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 12)
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(**sampling),
        compression=CompressionSpec(method=method, knobs=knobs or {}),
    )


@pytest.fixture(scope="module")
def chat_prompt(engine) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": QUESTION}])


# ---- bad input -> RequestError with a clear message and the offending field ------------------
def test_empty_prompt_is_rejected(engine) -> None:
    with pytest.raises(RequestError, match="prompt must not be empty") as info:
        engine.check_request(request([]))
    assert info.value.param == "prompt"
    with pytest.raises(RequestError, match="prompt must not be empty"):
        engine.encode_prompt("")
    with pytest.raises(RequestError, match="messages must not be empty"):
        engine.encode_chat([])


@pytest.mark.parametrize("budget", [0, -1])
def test_non_positive_budget_is_rejected(engine, chat_prompt, budget) -> None:
    with pytest.raises(RequestError, match=f"budget of method 'gemfilter' must be >= 1, got {budget}") as info:
        engine.check_request(request(chat_prompt, "gemfilter", {"budget": budget}))
    assert info.value.param == "compression.budget"


@pytest.mark.parametrize("layer", [30, 500])
def test_layer_out_of_range_is_rejected(engine, chat_prompt, layer) -> None:
    with pytest.raises(RequestError, match=rf"layer {layer} is out of range: this model has layers 0\.\.29") as info:
        engine.check_request(request(chat_prompt, "gemfilter", {"layer": layer}))
    assert info.value.param == "compression.layer"


def test_prompt_longer_than_the_context_is_rejected(engine) -> None:
    too_long = [42] * (engine.max_model_len + 1)
    with pytest.raises(RequestError, match=r"prompt is 8193 tokens, longer than the model's context of 8192 tokens"):
        engine.check_request(request(too_long))
    # GemFilter would shrink it, but the filter pass itself still has to fit the context.
    with pytest.raises(RequestError, match="longer than the model's context"):
        engine.check_request(request(too_long, "gemfilter", {"budget": 1024}))


def test_prompt_plus_max_tokens_beyond_the_context_is_rejected(engine) -> None:
    prompt = [42] * 8000
    with pytest.raises(RequestError, match=r"8000 prompt positions \+ 500 max_tokens") as info:
        engine.check_request(request(prompt, max_tokens=500))
    assert info.value.param == "max_tokens"
    # GemFilter restarts positions at 0 for the kept tokens, so the same request fits.
    assert engine.check_request(request(prompt, "gemfilter", {"budget": 1024}, max_tokens=500)).name == "gemfilter"
    # ... unless the kept tokens keep their places: then decoding goes on after position 8000.
    with pytest.raises(RequestError, match=r"8000 prompt positions \+ 500 max_tokens"):
        engine.check_request(request(prompt, "gemfilter", {"budget": 1024, "positions": "original"}, max_tokens=500))
    # ... and unless the prompt is too short for the budget to pay off: then it is prefilled whole.
    with pytest.raises(RequestError, match=r"8000 prompt positions \+ 500 max_tokens"):
        engine.check_request(request(prompt, "gemfilter", {"budget": 4096}, max_tokens=500))


def test_unknown_method_and_knob_list_what_is_allowed(engine, chat_prompt) -> None:
    with pytest.raises(RequestError, match="unknown compression method 'magic'; allowed: none, gemfilter"):
        engine.check_request(request(chat_prompt, "magic"))
    with pytest.raises(RequestError, match="method 'gemfilter' has no knob 'beta'; its knobs: budget, ratio"):
        engine.check_request(request(chat_prompt, "gemfilter", {"beta": 3}))
    with pytest.raises(RequestError, match="knob 'budget' of method 'gemfilter' must be int, got 'many'"):
        engine.check_request(request(chat_prompt, "gemfilter", {"budget": "many"}))


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"stop": [""]}, "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_is_rejected(engine, chat_prompt, sampling, message) -> None:
    with pytest.raises(RequestError, match=message):
        engine.check_request(request(chat_prompt, **sampling))


# ---- decoding ---------------------------------------------------------------------------------
def test_greedy_is_deterministic_and_answers(engine, chat_prompt) -> None:
    first = engine.generate(request(chat_prompt, max_tokens=16))
    second = engine.generate(request(chat_prompt, max_tokens=16))
    assert first.token_ids == second.token_ids
    assert first.text.strip()
    assert first.completion_tokens == len(first.token_ids) <= 16
    assert first.finish_reason in {"stop", "length"}
    assert first.prompt_tokens == len(chat_prompt)


def test_stream_yields_deltas_then_one_result(engine, chat_prompt) -> None:
    events = list(engine.events(request(chat_prompt, max_tokens=10)))
    deltas, result = events[:-1], events[-1]
    assert isinstance(result, GenerationResult)
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == result.text
    assert [d.token_id for d in deltas if d.token_id >= 0] == result.token_ids
    m = result.metrics
    assert m.ttft_ms > 0 and m.prefill_ms > 0 and m.e2e_ms >= m.ttft_ms
    assert m.kv_cache_bytes > 0 and m.peak_memory_bytes > 0 and m.memory_source


def test_max_tokens_bounds_the_output(engine, chat_prompt) -> None:
    result = engine.generate(request(chat_prompt, max_tokens=3, ignore_eos=True))
    assert result.completion_tokens == 3
    assert result.finish_reason == "length"


def test_stop_string_cuts_the_text_and_finishes(engine, chat_prompt) -> None:
    free = engine.generate(request(chat_prompt, max_tokens=16))
    words = free.text.split()
    assert len(words) >= 3, free.text
    stop = words[2]
    stopped = engine.generate(request(chat_prompt, max_tokens=16, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.text == free.text[: free.text.index(stop)]


@pytest.mark.slow
def test_sampling_with_a_seed_is_reproducible(engine, chat_prompt) -> None:
    def sample(seed: int) -> list[int]:
        return engine.generate(request(chat_prompt, max_tokens=12, temperature=1.3, seed=seed)).token_ids

    assert sample(123) == sample(123)
    assert len({tuple(sample(seed)) for seed in (1, 2, 3, 4)}) > 1  # the seed matters


def test_tiny_top_p_is_greedy(engine, chat_prompt) -> None:
    greedy = engine.generate(request(chat_prompt, max_tokens=8)).token_ids
    nucleus = engine.generate(request(chat_prompt, max_tokens=8, temperature=1.0, top_p=1e-6, seed=5)).token_ids
    assert nucleus == greedy


def test_kv_bytes_scale_with_the_kept_tokens(engine, count_tokens) -> None:
    from contract.needles import build_case

    case = build_case(600, depth=0.5, seed=21, count_tokens=count_tokens)
    ids = engine.encode_chat([{"role": "user", "content": case.user_message()}])
    full = engine.generate(request(ids, max_tokens=1))
    gem = engine.generate(request(ids, "gemfilter", {"budget": 200}, max_tokens=1))
    assert gem.compression.kept_tokens == 200
    # Same bytes per token in both caches: exactly kept/total of full attention's.
    assert gem.metrics.kv_cache_bytes * len(ids) == full.metrics.kv_cache_bytes * 200
    assert gem.metrics.select_ms > 0 and full.metrics.select_ms == 0


# ---- the incremental detokenizer ---------------------------------------------------------------
def feed(tokenizer, text: str, stop: list[str]) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


def test_detokenizer_releases_exactly_the_text(loaded_model) -> None:
    text = "Déjà vu: naïve café owners serve 3.14 crêpes 🥞 at noon."
    detok, deltas = feed(loaded_model.tokenizer, text, [])
    assert "".join(deltas) == text == detok.text
    assert not detok.stopped
    assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_detokenizer_cuts_at_a_stop_string_spanning_tokens(loaded_model) -> None:
    text = "The answer is forty-two. END OF ANSWER and more text after it."
    detok, deltas = feed(loaded_model.tokenizer, text, ["END OF"])
    assert detok.stopped
    assert "".join(deltas) == detok.text == "The answer is forty-two. "


def test_detokenizer_holds_back_a_possible_stop_prefix(loaded_model) -> None:
    tokenizer = loaded_model.tokenizer
    detok = IncrementalDetokenizer(tokenizer, ["STOP"])
    released = "".join(detok.add(t) for t in tokenizer("Hello ST", add_special_tokens=False)["input_ids"])
    assert not released.endswith("ST")  # might be the start of "STOP": held back
    assert released + detok.flush() == "Hello ST"
