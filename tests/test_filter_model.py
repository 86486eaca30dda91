"""The truncated HF filter model the vllm backend runs GemFilter on (server/engine/filter_model.py).

It needs no vLLM, so it runs in the main test suite: it must hold exactly layers ``0..r`` and
pick exactly the ids GemFilter picks on the full model, in float32 and in bfloat16 (what
``--filter-dtype auto`` gives on a CPU with AMX or AVX512-BF16).
"""

from __future__ import annotations

import copy

import pytest
import torch

from compressors.gemfilter import GemFilter
from compressors.probe import decoder_layers
from contract.needles import build_case
from server.engine.filter_model import load_filter_model

BUDGET = 64


@pytest.fixture(scope="module")
def filter_model(loaded_model):
    return load_filter_model(loaded_model.path)


@pytest.fixture(scope="module")
def prompt_ids(engine) -> torch.Tensor:
    case = build_case(500, depth=0.4, seed=11, count_tokens=lambda text: len(engine.encode_prompt(text)))
    return torch.tensor([engine.encode_chat([{"role": "user", "content": case.user_message()}])])


def test_holds_only_layers_up_to_the_calibrated_filter_layer(filter_model, loaded_model):
    full = loaded_model.model
    r = GemFilter().filter_layer(full)
    layer_params = sum(p.numel() for p in decoder_layers(full)[0].parameters())
    embed = full.get_input_embeddings().weight.numel()
    final_norm = full.model.norm.weight.numel()
    assert filter_model.max_layer == filter_model.default_layer == r
    assert filter_model.num_layers == r + 1 < len(decoder_layers(full)) == filter_model.full_num_layers
    # Embeddings + r+1 decoder layers + the final norm: no later layer, no LM head.
    assert filter_model.parameter_count() == embed + (r + 1) * layer_params + final_norm


def test_out_of_range_layer_is_refused(loaded_model):
    with pytest.raises(ValueError, match="out of range"):
        load_filter_model(loaded_model.path, layer=30)


def test_float32_picks_exactly_what_the_full_model_picks(filter_model, loaded_model, prompt_ids):
    assert filter_model.dtype == torch.float32
    # The layer is explicit: the truncated model's own config would give a different default.
    method = GemFilter(budget=BUDGET, layer=filter_model.max_layer)
    on_full = method.select(loaded_model.model, prompt_ids, BUDGET, loaded_model.tokenizer).kept_indices
    on_filter = method.select(filter_model.model, prompt_ids, BUDGET, loaded_model.tokenizer).kept_indices
    assert len(on_full) == BUDGET
    assert on_filter == on_full


def test_cast_to_bfloat16_picks_what_the_full_model_in_bfloat16_picks(loaded_model, prompt_ids):
    filter_model = load_filter_model(loaded_model.path)
    filter_model.place(torch.bfloat16)
    assert filter_model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in filter_model.model.parameters())
    full_bf16 = copy.deepcopy(loaded_model.model).to(torch.bfloat16)
    method = GemFilter(budget=BUDGET, layer=filter_model.max_layer)
    on_full = method.select(full_bf16, prompt_ids, BUDGET, loaded_model.tokenizer).kept_indices
    assert method.select(filter_model.model, prompt_ids, BUDGET, loaded_model.tokenizer).kept_indices == on_full
    # bf16 changes the scores a little, not the method: most kept tokens are the float32 ones.
    on_full_fp32 = set(method.select(loaded_model.model, prompt_ids, BUDGET, loaded_model.tokenizer).kept_indices)
    assert len(on_full_fp32 & set(on_full)) >= 0.8 * BUDGET


@pytest.mark.parametrize(
    ("setting", "running", "cores", "expected"),
    [(None, 0, 2, 2), (None, 1, 2, 1), (None, 3, 16, 1), (4, 0, 2, 4), (1, 0, 16, 1)],
)
def test_filter_pass_threads_take_every_core_only_while_vllm_is_idle(setting, running, cores, expected):
    from server.engine.filter_model import filter_thread_count

    assert filter_thread_count(setting, running, cores) == expected
