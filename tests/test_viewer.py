"""The selection viewer's server side: the page and its assets (open like /health), and what the
one span renderer (server/engine/spans.py) puts in ``compression.selection``. The page itself
runs in headless Chromium in tests/test_viewer_browser.py (``make test-browser``)."""

from __future__ import annotations

import itertools
import json
import math
import re

import httpx
import pytest
import torch

from compressors import Selection
from contract.needles import Needle, build_case
from contract.protocol import SelectionInfo
from server.engine.spans import MAX_LAYER_BINS, MAX_SCORE_BINS, layer_coverage, score_strip, selection_info
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
from tests.conftest import TEST_API_KEY

NEEDLE = Needle(
    "The special magic number for Tallinn is 4817263.", "What is the special magic number for Tallinn?", "4817263"
)


@pytest.fixture(scope="module")
def needle_prompt(engine, count_tokens) -> list[int]:
    case = build_case(1200, depth=0.4, seed=7, count_tokens=count_tokens, needle=NEEDLE)
    return engine.encode_chat([{"role": "user", "content": case.user_message()}])


def selection_of(engine, prompt_ids: list[int], method: str, knobs: dict, scores: bool = True) -> SelectionInfo:
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(max_tokens=1, temperature=0.0),
        compression=CompressionSpec(method=method, knobs=knobs, return_selection=True, return_scores=scores),
    )
    selection = engine.generate(request).compression.selection
    assert selection is not None
    return selection


def assert_segments_tile_the_prompt(engine, info: SelectionInfo, prompt_ids: list[int]) -> None:
    """Alternating kept/dropped runs from 0 to n whose kept ones are the kept indices and the spans,
    and whose texts put together are the prompt's text."""
    segments = info.segments
    assert segments[0].start == 0 and segments[-1].end == len(prompt_ids)
    for before, after in itertools.pairwise(segments):
        assert before.end == after.start and before.kept != after.kept
    kept = [i for s in segments if s.kept for i in range(s.start, s.end)]
    assert kept == info.kept_indices
    assert [(s.start, s.end, s.text) for s in info.spans] == [(s.start, s.end, s.text) for s in segments if s.kept]
    assert "".join(s.text for s in segments) == engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)


# ---- the page --------------------------------------------------------------------------------
def test_viewer_page_and_assets_load_without_the_key(server_url_with_key: str) -> None:
    page = httpx.get(f"{server_url_with_key}/viewer")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    config = json.loads(re.search(r'<script id="viewer-config" type="application/json">(.*?)</script>', page.text)[1])
    assert config["methods"][:2] == ["none", "gemfilter"] and "pyramidkv" in config["methods"]
    assert config["attention"][0] == "dense"
    for name, kind in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        asset = httpx.get(f"{server_url_with_key}/viewer/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert f'/viewer/{name}"' in page.text
    # Nothing else under /viewer is open, and the API the page calls still wants the key.
    assert httpx.get(f"{server_url_with_key}/viewer/../v1/models").status_code in (401, 404)
    assert httpx.get(f"{server_url_with_key}/viewer/secret.txt").status_code == 401
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    assert httpx.get(f"{server_url_with_key}/viewer/secret.txt", headers=headers).status_code == 404
    assert httpx.get(f"{server_url_with_key}/v1/models").status_code == 401


def test_the_page_loads_nothing_from_elsewhere(server_url: str) -> None:
    """No CDN: every script, style and request of the page goes to this server."""
    page = httpx.get(f"{server_url}/viewer").text
    script = httpx.get(f"{server_url}/viewer/viewer.js").text
    css = httpx.get(f"{server_url}/viewer/viewer.css").text
    for text in (page, script, css):
        assert not re.search(r"https?://", text), re.search(r".{40}https?://.{40}", text)
    assert "localStorage" not in script and "sessionStorage" not in script and "document.cookie" not in script


# ---- what the selection says -----------------------------------------------------------------
def test_gemfilter_scores_are_the_ones_it_selected_by(engine, needle_prompt) -> None:
    """Token spans: every kept token outside the protected head and tail scores at least as high as every
    dropped token (the top-k of the pooled scores the strip shows), one bin per token."""
    info = selection_of(engine, needle_prompt, "gemfilter", {"budget": 128, "span": "token"})
    n = len(needle_prompt)
    assert_segments_tile_the_prompt(engine, info, needle_prompt)
    strip = info.scores
    assert strip is not None and info.layer_coverage is None
    assert strip.bin_tokens == 1 and len(strip.values) == n
    assert min(strip.values) == 0.0 and max(strip.values) == 1.0
    tail = set(range(n - info.protected_tail, n))
    head = set(range(getattr(info, "protected_head", 0)))  # a selection detail (GemFilter's head knob)
    assert head  # the default keeps the first tokens too
    kept = set(info.kept_indices)
    lowest_kept = min(strip.values[i] for i in kept - tail - head)
    highest_dropped = max(strip.values[i] for i in range(n) if i not in kept)
    assert lowest_kept >= highest_dropped - 1e-4  # values are rounded to 4 digits


def test_return_selection_alone_has_no_scores(engine, needle_prompt) -> None:
    info = selection_of(engine, needle_prompt, "gemfilter", {"budget": 128}, scores=False)
    assert info.scores is None and info.layer_coverage is None
    assert_segments_tile_the_prompt(engine, info, needle_prompt)
    assert any(NEEDLE.answer in span.text for span in info.spans)  # whole words: the number is kept whole


def test_pyramidkv_coverage_counts_each_layers_cache(engine, needle_prompt) -> None:
    """Per layer: coverage x bin size x heads adds up to the entries each head holds after prefill,
    and PyramidKV's layers hold different numbers (its budgets narrow with depth)."""
    info = selection_of(engine, needle_prompt, "pyramidkv", {"budget": 128})
    coverage = info.layer_coverage
    assert coverage is not None and info.scores is None
    n = len(needle_prompt)
    layers = coverage.layers
    assert len(layers) == engine.model.config.num_hidden_layers
    per_layer = info.model_extra["kv_tokens_per_layer"]
    bins = math.ceil(n / coverage.bin_tokens)
    for layer in layers:
        assert layer.kv_tokens == per_layer[str(layer.layer)]
        assert len(layer.coverage) == bins
        sizes = [min(coverage.bin_tokens, n - b * coverage.bin_tokens) for b in range(bins)]
        held = sum(c * size * layer.kv_heads for c, size in zip(layer.coverage, sizes, strict=True))
        assert held == pytest.approx(layer.kv_tokens * layer.kv_heads, abs=0.01 * bins)
    assert len({layer.kv_tokens for layer in layers}) > 1
    assert layers[0].kv_tokens > layers[-1].kv_tokens


def test_bins_are_bounded() -> None:
    n = 5 * MAX_SCORE_BINS + 3
    scores = torch.arange(n, dtype=torch.float32)
    strip = score_strip(scores, MAX_SCORE_BINS)
    assert strip.bin_tokens == 6 and len(strip.values) == math.ceil(n / 6) <= MAX_SCORE_BINS
    assert strip.values[0] == pytest.approx(5 / (n - 1), abs=1e-4)  # a bin shows its best token
    assert strip.values[-1] == 1.0
    flat = score_strip(torch.full((10,), 3.0), MAX_SCORE_BINS)
    assert flat.values == [0.0] * 10
    # Two heads of one layer: head 0 holds positions 0..9, head 1 holds 0 and 1000 (and a decode
    # position past the prompt, not counted).
    positions = {3: torch.tensor([[*range(10), 0], [*range(1000, 1010), 4000]])}
    cover = layer_coverage(positions, 4000, MAX_LAYER_BINS)
    assert cover.bin_tokens == math.ceil(4000 / MAX_LAYER_BINS) == 16
    layer = cover.layers[0]
    assert (layer.layer, layer.kv_heads, layer.kv_tokens) == (3, 2, 11)
    assert len(layer.coverage) == 250
    assert layer.coverage[0] == pytest.approx(11 / 32, abs=1e-4)  # 11 of 16 x 2 pairs
    assert layer.coverage[1000 // 16] == pytest.approx(8 / 32, abs=1e-4)  # 1000..1007 of bin 62


def test_a_selection_without_tensors_still_renders(engine) -> None:
    ids = engine.encode_prompt("one two three four five six")
    selection = Selection(method="x", prompt_tokens=len(ids), kept_indices=[0, 1, len(ids) - 1])
    info = selection_info(selection, engine.tokenizer, ids, with_scores=True)
    assert [s.kept for s in info.segments] == [True, False, True]
    assert info.scores is None and info.layer_coverage is None


def test_http_return_scores_implies_the_selection(server_url: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "The sky over the harbour was grey. " * 40 + "What colour was it?"}],
        "max_tokens": 1,
        "temperature": 0,
        "compression": {"method": "gemfilter", "budget": 64, "payoff_ratio": 0, "return_scores": True},
    }
    response = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    selection = response.json()["compression"]["selection"]
    assert len(selection["kept_indices"]) == 64
    assert selection["scores"]["bin_tokens"] == 1
    assert len(selection["scores"]["values"]) == response.json()["usage"]["prompt_tokens"]
    assert sum(s["end"] - s["start"] for s in selection["segments"] if s["kept"]) == 64
