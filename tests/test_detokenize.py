"""The incremental detokenizer on both shipped tokenizers: the text equals a one-shot decode of
all tokens, stop strings cut exactly, and the decode work grows linearly with the output."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.detokenize import IncrementalDetokenizer
from server.models import resolve_model_dir

TEXTS = [
    "Déjà vu: naïve café owners serve 3.14 crêpes 🥞 at noon.",
    "日本語のテキスト、中文文本和한국어가 섞여 있습니다。",
    "Family 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, and 🎉🎉🎉 in a row",
    "  leading spaces\n\nnew lines\ttabs and trailing  ",
    "code: def f(x):\n    return x ** 2  # squared",
]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def tokenizer(request):
    """The tokenizer alone (Gemma's first use converts the GGUF once, ~90 s)."""
    _, model_dir = resolve_model_dir(request.param)
    return AutoTokenizer.from_pretrained(model_dir)


class SlowOnly:
    """The tokenizer without its Rust backend: the detokenizer's own window path."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


class CountingDecodes(SlowOnly):
    """Counts the token ids passed to ``decode``: the detokenizer's decode work."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.decoded_ids = 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded_ids += len(ids)
        return super().decode(ids, **kwargs)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def feed(tokenizer, ids: list[int], stop: list[str], **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, stop, **kwargs)
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("backend", ["rust", "window"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_equals_a_one_shot_decode(tokenizer, backend: str, skip_special_tokens: bool) -> None:
    specials = [t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None]
    used = tokenizer if backend == "rust" else SlowOnly(tokenizer)
    for text in TEXTS:
        ids = [*specials[:1], *ids_of(tokenizer, text), *specials[1:]]
        detok, deltas = feed(used, ids, [], skip_special_tokens=skip_special_tokens)
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.text == expected, text
        assert detok.token_ids == ids and not detok.stopped
        assert all("\ufffd" not in d for d in deltas), deltas  # never half a character


def test_text_is_held_while_a_character_is_split_across_tokens(tokenizer) -> None:
    split = [char for char in ("🥞", "한", "𝄞", "🦩") if len(ids_of(tokenizer, char)) > 1]
    assert split  # each tokenizer splits some of these one-codepoint characters into bytes
    for char in split:
        detok, deltas = feed(tokenizer, ids_of(tokenizer, char), [])
        assert deltas[:-2] == [""] * (len(deltas) - 2), deltas  # mid-character: nothing released
        assert "".join(deltas) == char == detok.text


@pytest.mark.parametrize("backend", ["rust", "window"])
def test_stop_strings_spanning_tokens_cut_exactly(tokenizer, backend: str) -> None:
    used = tokenizer if backend == "rust" else SlowOnly(tokenizer)
    cases = [
        ("The answer is forty-two. END OF ANSWER and more.", ["END OF"], "The answer is forty-two. "),
        ("Café 🥞 crêpes, 日本語のテキスト", ["のテ"], "Café 🥞 crêpes, 日本語"),
        ("emoji 🎉🎉 party", ["🎉 p", "zzz"], "emoji 🎉"),
        # Two stops completed by the same token: the earlier occurrence cuts, whatever the list order.
        ("one two three four", ["two three", "three"], "one "),
        ("one two three four", ["three", "two three"], "one "),
    ]
    for text, stop, expected in cases:
        detok, deltas = feed(used, ids_of(tokenizer, text), stop)
        assert detok.stopped, text
        assert "".join(deltas) == detok.text == expected


def test_a_possible_stop_prefix_is_held_back(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, ["STOP"])
    released = "".join(detok.add(t) for t in ids_of(tokenizer, "Hello ST"))
    assert not released.endswith("ST")  # might be the start of "STOP": held back
    assert released + detok.flush() == "Hello ST" == detok.text


def decode_work(tokenizer, tokens: int) -> int:
    base = ids_of(tokenizer, " ".join(TEXTS))
    ids = (base * (tokens // len(base) + 1))[:tokens]
    counting = CountingDecodes(tokenizer)
    _, deltas = feed(counting, ids, ["never appears"])
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    return counting.decoded_ids


def test_decode_work_grows_linearly_with_the_output(tokenizer) -> None:
    short, long = decode_work(tokenizer, 300), decode_work(tokenizer, 1200)
    # Re-decoding everything each step costs n^2/2 token decodes: 16x for 4x the tokens.
    assert long <= 4.5 * short, f"decode work {short} ids for 300 tokens, {long} for 1200 (quadratic)"
    assert long <= 10 * 1200, f"{long} ids decoded for 1200 tokens"


def test_a_fast_tokenizer_decodes_through_decode_stream(tokenizer) -> None:
    """With a Rust backend no Python-level decode runs at all: DecodeStream does the work."""

    class CountingFast(CountingDecodes):
        backend_tokenizer = tokenizer.backend_tokenizer

    counting = CountingFast(tokenizer)
    ids = ids_of(tokenizer, " ".join(TEXTS))
    _, deltas = feed(counting, ids, [])
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded_ids == 0
