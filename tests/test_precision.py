"""``--dtype`` / ``--filter-dtype`` (issue 23): ``auto`` follows what the hardware reports, an explicit
dtype is what the weights hold, a bfloat16 model answers, and no request can change the dtype."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import torch

from cli.main import main
from compressors.gemfilter import default_filter_layer
from compressors.probe import decoder_layers
from contract.needles import build_case
from server.engine.hf import HFEngine
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
from server.precision import Capability, DtypeError, check_runs, resolve_dtype

AVX2_ONLY = Capability("cpu", frozenset({"avx", "avx2", "fma"}))  # e.g. AMD Zen 3
AVX512_BF16 = Capability("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))  # e.g. Zen 4, Cooper Lake
AMX = Capability("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))  # Sapphire Rapids


# ---- resolution, with a fake capability ------------------------------------------------------------
@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        (AVX2_ONLY, "float32"),
        (AVX512_BF16, "bfloat16"),
        (AMX, "bfloat16"),
        (Capability("cpu", frozenset({"avx512f", "avx512_vnni"})), "float32"),  # AVX512 without BF16
        (Capability("cuda", cuda_bf16=True), "bfloat16"),
        (Capability("cuda", cuda_bf16=False), "float16"),
    ],
)
def test_auto_resolves_per_capability(capability: Capability, expected: str) -> None:
    resolved = resolve_dtype("auto", capability.device_type, capability)
    assert resolved.name == expected
    assert resolved.requested == "auto"
    for flag in capability.native_bf16_flags:  # the log line says what was found
        assert flag in resolved.reason


def test_auto_on_a_cpu_without_native_bfloat16_says_why() -> None:
    reason = resolve_dtype("auto", "cpu", AVX2_ONLY).reason
    assert "amx_bf16" in reason and "avx512_bf16" in reason and "emulated" in reason


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(name: str) -> None:
    for capability in (AVX2_ONLY, AMX):
        assert resolve_dtype(name, "cpu", capability).name == name


def test_an_emulated_explicit_dtype_is_said_to_be_slow() -> None:
    assert "emulated" in resolve_dtype("bfloat16", "cpu", AVX2_ONLY).reason
    assert "emulated" not in resolve_dtype("bfloat16", "cpu", AMX).reason


@pytest.mark.parametrize("name", ["float8", "fp32", "BF16", "", "half"])
def test_unknown_dtypes_are_refused(name: str) -> None:
    with pytest.raises(DtypeError, match="must be one of auto, bfloat16, float16, float32"):
        resolve_dtype(name, "cpu", AVX2_ONLY)


def test_bfloat16_on_a_gpu_without_it_is_refused() -> None:
    with pytest.raises(DtypeError, match="cannot run on this GPU"):
        resolve_dtype("bfloat16", "cuda", Capability("cuda", cuda_bf16=False))


def test_a_dtype_the_device_cannot_compute_is_one_line() -> None:
    with pytest.raises(DtypeError) as error:
        check_runs(torch.int8, "cpu")  # not a float dtype: SDPA refuses it
    assert "\n" not in str(error.value) and "cannot run on cpu" in str(error.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--dtype", "float8"],
        ["generate", "--filter-dtype", "half"],
        ["serve", "--dtype", "float8"],
        ["serve", "--filter-dtype", "int4"],
    ],
)
def test_bad_dtype_on_the_cli_is_one_line_and_exit_2(capsys, argv: list[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "dtype" in err and ("float8" in err or "half" in err or "int4" in err)


# ---- what the weights hold -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_engine() -> HFEngine:
    from server.models import load_model

    return HFEngine(load_model("smollm2-135m-instruct", device="cpu", dtype="bfloat16", filter_dtype="bfloat16"))


def test_auto_loads_what_auto_resolves_to_here() -> None:
    from server.models import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu", max_model_len=1024)
    expected = resolve_dtype("auto", "cpu").name
    assert loaded.dtype is not None and loaded.dtype.name == expected
    assert {str(p.dtype) for p in loaded.model.parameters()} == {f"torch.{expected}"}


def test_an_explicit_dtype_is_what_every_weight_holds(bf16_engine: HFEngine) -> None:
    assert {p.dtype for p in bf16_engine.model.parameters()} == {torch.bfloat16}
    assert bf16_engine.dtype == bf16_engine.filter_dtype == "bfloat16"
    assert bf16_engine.filter_model is None  # the same dtype: the pass runs on the model itself


@pytest.mark.slow
def test_a_filter_dtype_other_than_the_models_runs_on_a_copy_of_layers_0_to_r(loaded_model, count_tokens) -> None:
    """float32 model, bfloat16 filter pass: the copy holds layers 0..r in bfloat16, the pass runs there
    and the response says so."""
    loaded = dataclasses.replace(loaded_model, filter_dtype=resolve_dtype("bfloat16", "cpu"))
    engine = HFEngine(loaded)
    layer = default_filter_layer(loaded_model.model.config)
    assert engine.dtype == "float32" and engine.filter_dtype == "bfloat16"
    assert engine.filter_model is not None
    assert len(decoder_layers(engine.filter_model)) == layer + 1
    assert {p.dtype for p in engine.filter_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    case = build_case(700, depth=0.5, seed=11, count_tokens=count_tokens)
    ids = engine.encode_chat([{"role": "user", "content": case.user_message()}])
    result = greedy(engine, ids, "gemfilter", budget=128, payoff_ratio=0)
    assert result.compression.kept_tokens == 128
    assert result.compression.filter_dtype == "bfloat16"
    deeper = greedy(engine, ids, "gemfilter", budget=128, payoff_ratio=0, layer=layer + 1)
    assert deeper.compression.filter_dtype == "float32"  # past the copy: the model itself


def greedy(engine: HFEngine, prompt_ids: list[int], method: str, max_tokens: int = 4, **knobs):
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        compression=CompressionSpec(method=method, knobs=knobs),
    )
    return engine.generate(request)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["float32", "bfloat16"])
def test_gemfilter_with_a_budget_covering_the_prompt_equals_none_in_each_dtype(
    which: str, engine, bf16_engine, count_tokens
) -> None:
    chosen = engine if which == "float32" else bf16_engine
    assert chosen.dtype == which
    case = build_case(400, depth=0.5, seed=5, count_tokens=count_tokens)
    ids = chosen.encode_chat([{"role": "user", "content": case.user_message()}])
    plain = greedy(chosen, ids, "none", max_tokens=16)
    covered = greedy(chosen, ids, "gemfilter", max_tokens=16, budget=len(ids) + 10)
    assert covered.compression.kept_tokens == len(ids)
    assert covered.token_ids == plain.token_ids


@pytest.mark.slow
def test_a_bfloat16_request_answers_a_4k_needle(bf16_engine: HFEngine) -> None:
    """bfloat16 through the whole request (filter pass and generation) keeps the answer at ~4K."""
    count = lambda text: len(bf16_engine.encode_prompt(text))  # noqa: E731
    case = build_case(4000, depth=0.3, seed=2021, count_tokens=count)
    ids = bf16_engine.encode_chat([{"role": "user", "content": case.user_message()}])
    assert 3800 <= len(ids) <= 4100
    result = greedy(bf16_engine, ids, "gemfilter", max_tokens=20, budget=1024)
    assert result.compression.filter_dtype == "bfloat16"
    assert result.compression.kept_tokens == 1024
    assert case.needle.found_in(result.text), (case.needle, result.text)


# ---- over HTTP: reported, and not a request's to change ----------------------------------------------
def test_models_and_ready_report_the_dtype(server_url: str) -> None:
    card = httpx.get(f"{server_url}/v1/models").json()["data"][0]
    assert card["dtype"] == "float32" and card["filter_dtype"] == "float32"
    assert httpx.get(f"{server_url}/ready").json()["dtype"] == "float32"


def test_a_request_cannot_change_the_dtype(server_url: str) -> None:
    body = {"prompt": [100, 101, 102], "max_tokens": 1, "compression": {"method": "gemfilter", "dtype": "bfloat16"}}
    refused = httpx.post(f"{server_url}/v1/completions", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "compression.dtype"
    ignored = httpx.post(f"{server_url}/v1/completions", json={"prompt": [100, 101], "max_tokens": 1, "dtype": "bf16"})
    assert ignored.status_code == 200  # an unknown OpenAI field is ignored, as every other one is
    assert httpx.get(f"{server_url}/v1/models").json()["data"][0]["dtype"] == "float32"


# ---- a bfloat16 decode step's attention on the CPU ------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_bfloat16_decode_attention_is_float32_math_over_the_bfloat16_states(with_mask: bool) -> None:
    """The CPU decode path (compressors.probe.decode_attention_float32): GQA kept at KV-head count,
    a boolean mask honoured, and at least as close to the exact result as torch's bfloat16 SDPA."""
    import torch.nn.functional as F
    from torch import nn

    from compressors.probe import decode_attention_float32, sdpa_attention

    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 9, 1, 64, generator=generator).mul(3).to(torch.bfloat16)
    key = torch.randn(2, 3, 700, 64, generator=generator).mul(3).to(torch.bfloat16)
    value = torch.randn(2, 3, 700, 64, generator=generator).to(torch.bfloat16)
    mask = torch.rand(2, 1, 1, 700, generator=generator) > 0.3 if with_mask else None
    exact = F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=mask, scale=0.125, enable_gqa=True
    ).transpose(1, 2)
    torch_bf16 = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.125, enable_gqa=True)
    ours = decode_attention_float32(query, key, value, mask, 0.125)
    assert ours.shape == (2, 1, 9, 64) and ours.dtype == torch.bfloat16
    error = (ours.double() - exact).abs().max()
    assert error <= (torch_bf16.transpose(1, 2).double() - exact).abs().max()
    assert error < 0.02
    module = nn.Module()
    module.num_key_value_groups = 3
    routed, _ = sdpa_attention(module, query, key, value, mask, scaling=0.125, dropout=0.0)
    assert torch.equal(routed, ours)  # the probe's SDPA takes this path for a bfloat16 decode on the CPU


def test_bfloat16_decode_attention_takes_values_wider_than_keys() -> None:
    """Multi-head latent attention (DeepSeek) has value heads of another size than query/key heads."""
    import torch.nn.functional as F

    from compressors.probe import decode_attention_float32

    generator = torch.Generator().manual_seed(4)
    query = torch.randn(1, 4, 1, 24, generator=generator).to(torch.bfloat16)
    key = torch.randn(1, 4, 50, 24, generator=generator).to(torch.bfloat16)
    value = torch.randn(1, 4, 50, 40, generator=generator).to(torch.bfloat16)
    exact = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), scale=0.2).transpose(1, 2)
    ours = decode_attention_float32(query, key, value, None, 0.2)
    assert ours.shape == (1, 1, 4, 40)
    torch.testing.assert_close(ours.double(), exact, atol=2e-2, rtol=0)
