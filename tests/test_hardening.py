"""Issue 12: what a hostile but legitimate user found. Each test is one finding, and each failed
on the server before the fix (noted per test)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from server.guards import MIN_BODY_LIMIT, default_body_limit
from tests.conftest import TEST_API_KEY, make_test_app, serve_app
from tests.test_server_http import error_of, metric, scrape, sse_events

SHORT = {"prompt": "Hello there, how are you?", "max_tokens": 3, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def small_limits_url(engine) -> Iterator[str]:
    """A server with a 4 KiB body limit."""
    with serve_app(make_test_app(engine, max_request_bytes=4096)) as url:
        yield url


# ---- 1. one large request must not stall everyone ---------------------------------------------
def test_body_over_the_limit_is_413_from_content_length(small_limits_url: str) -> None:
    body = {**SHORT, "prompt": "x" * 10_000}
    error = error_of(httpx.post(f"{small_limits_url}/v1/completions", json=body), 413)
    assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]


def test_chunked_body_over_the_limit_is_413(small_limits_url: str) -> None:
    payload = json.dumps({**SHORT, "prompt": "x" * 10_000}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        for start in range(0, len(payload), 1000):
            yield payload[start : start + 1000]

    response = httpx.post(
        f"{small_limits_url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    error = error_of(response, 413)
    assert "4096 bytes" in error["message"]


def test_default_body_limit_scales_with_the_context() -> None:
    assert default_body_limit(None) == MIN_BODY_LIMIT
    assert default_body_limit(8192) == MIN_BODY_LIMIT  # 64 B x 8192 = 512 KiB < 1 MiB
    assert default_body_limit(131072) == 64 * 131072


def test_prompt_that_cannot_fit_is_refused_before_tokenization(engine, monkeypatch) -> None:
    too_many_chars = engine.encoder.max_chars + 1

    def tokenizer_must_not_run(*args, **kwargs):
        raise AssertionError("tokenized a prompt the character bound already refuses")

    # A body limit above the character bound, so that the bound is what answers.
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "a" * too_many_chars}]}
    with serve_app(make_test_app(engine, max_request_bytes=4 * too_many_chars)) as url:
        monkeypatch.setattr(engine.encoder, "tokenizer", tokenizer_must_not_run)
        for path, body, param in (
            ("/v1/completions", {**SHORT, "prompt": "a" * too_many_chars}, "prompt"),
            ("/v1/chat/completions", long_chat, "messages"),
            ("/tokenize", {"prompt": "a" * too_many_chars}, "prompt"),
        ):
            error = error_of(httpx.post(f"{url}{path}", json=body, timeout=60), 400)
            assert "characters, more than fit in the model's context" in error["message"], error
            assert error["param"] == param


def test_tokenize_refuses_a_prompt_longer_than_the_context(server_url: str, engine) -> None:
    text = "word " * (engine.max_model_len + 10)
    error = error_of(httpx.post(f"{server_url}/tokenize", json={"prompt": text}, timeout=60), 400)
    assert f"longer than the model's context of {engine.max_model_len} tokens" in error["message"]
    assert error["param"] == "prompt"


def test_tokenization_runs_off_the_event_loop(engine) -> None:
    """While one request's prompt is being tokenized, /health still answers (before the fix,
    tokenization ran on the event loop: /health waited 22.6 s behind a 20 MB prompt)."""
    entered, release = threading.Event(), threading.Event()
    real_encode = engine.encoder.encode_prompt

    def slow_encode(text: str) -> list[int]:
        entered.set()
        release.wait(timeout=60)
        return real_encode(text)

    with serve_app(make_test_app(engine)) as url:
        engine.encoder.encode_prompt = slow_encode  # instance attribute: this test only
        try:
            worker = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=SHORT, timeout=120))
            worker.start()
            assert entered.wait(timeout=30)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        finally:
            release.set()
            del engine.encoder.encode_prompt
            worker.join(timeout=120)


# ---- 2. sampling values the schema allows must not 500 ----------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1e-40}, {"top_p": 5e-324}])
@pytest.mark.parametrize("stream", [False, True])
def test_extreme_sampling_values_generate(server_url: str, sampling: dict, stream: bool) -> None:
    body = {**SHORT, "temperature": 0.7, **sampling, "seed": 1, "stream": stream}
    response = httpx.post(f"{server_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    if stream:
        events = sse_events(response.text)
        assert not any('"error"' in event for event in events), events
    else:
        assert response.json()["usage"]["completion_tokens"] == 3


def test_tiny_temperature_is_exactly_greedy(server_url: str) -> None:
    greedy = httpx.post(f"{server_url}/v1/completions", json={**SHORT, "max_tokens": 8}, timeout=120).json()
    tiny = httpx.post(
        f"{server_url}/v1/completions", json={**SHORT, "max_tokens": 8, "temperature": 1e-300, "seed": 3}, timeout=120
    ).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


# ---- 3. unbounded integers are 400s naming the field, before any work --------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"compression": {"method": "snapkv", "kernel_size": 2**61 + 1}}, "compression.kernel_size"),
        ({"compression": {"method": "gemfilter", "kernel_size": 2**63 + 1}}, "compression.kernel_size"),
        (
            {"compression": {"method": "none", "attention": "streaming", "attention_knobs": {"window": 2**40}}},
            "compression.attention_knobs.window",
        ),
        ({"compression": {"method": "gemfilter", "budget": 2**40}}, "compression.budget"),
    ],
)
def test_huge_integers_are_400_naming_the_field(server_url: str, body: dict, param: str) -> None:
    error = error_of(httpx.post(f"{server_url}/v1/completions", json={**SHORT, **body}, timeout=60), 400)
    assert error["param"] == param, error
    assert "torch" not in error["message"].lower()


def test_any_integer_seed_is_folded_into_63_bits(server_url: str) -> None:
    """OpenAI's seed is any integer: 2**63 + 7 samples exactly as 7 does."""

    def sampled(seed: int) -> str:
        body = {**SHORT, "max_tokens": 8, "temperature": 1.0, "seed": seed}
        response = httpx.post(f"{server_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    assert sampled(2**63 + 7) == sampled(7)


def test_integral_floats_are_integers(server_url: str) -> None:
    """JSON Schema counts 2.0 as an integer: a prompt of [1.0, 2.0] is the prompt [1, 2]."""
    answers = []
    for prompt, max_tokens in (([1.0, 2.0], 4.0), ([1, 2], 4)):
        body = {**SHORT, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{server_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers.append((response.json()["choices"][0]["text"], response.json()["usage"]))
    assert answers[0] == answers[1]


def test_text_with_no_token_starts_a_document(server_url: str) -> None:
    """A control character tokenizes to nothing: the prompt is the start of a document, as OpenAI
    takes an empty prompt, not a 400 for text the schema allows."""
    response = httpx.post(f"{server_url}/v1/completions", json={**SHORT, "prompt": "\u0016"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 1


def test_chat_max_tokens_beyond_the_context_is_refused_even_when_overridden(server_url: str) -> None:
    body = {**CHAT, "max_tokens": 10**12, "max_completion_tokens": 5}
    error = error_of(httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=60), 400)
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"


def test_chat_without_a_template_and_no_text_starts_a_document(engine) -> None:
    import copy

    from server.engine.tokenize import PromptEncoder

    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = None  # a base model's tokenizer: turns are joined as plain text
    encoder = PromptEncoder(tokenizer, engine.max_model_len)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert encoder.encode_chat([{"role": "user", "content": ""}]) == [start]


# ---- 4. a budget below the window or sinks keeps the newest tokens (kvpress's semantics) -------
@pytest.mark.parametrize(
    "compression",
    [
        {"method": "snapkv", "ratio": 0.01},
        {"method": "pyramidkv", "ratio": 0.01},
        {"method": "streamingllm", "budget": 3},
    ],
)
def test_budget_below_window_or_sinks_is_served_within_budget(server_url: str, count_tokens, compression) -> None:
    prompt = "The harbour was quiet that morning and the ferries waited. " * 60
    n = count_tokens(prompt)
    assert n >= 600
    body = {**SHORT, "prompt": prompt, "compression": compression}
    response = httpx.post(f"{server_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    budget = compression.get("budget") or math.ceil(compression["ratio"] * n)
    assert response.json()["compression"]["kept_tokens"] == budget


# ---- 5. strict types; unsupported fields are named --------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**SHORT, "compression": {"method": "gemfilter", "budget": True}}, "compression.budget"),
        ("/v1/completions", {**SHORT, "compression": {"method": ""}}, "compression.method"),
        # the union's discriminator: left out is the default method, null names no branch
        ("/v1/chat/completions", {**CHAT, "compression": {"method": None}}, "compression.method"),
        ("/v1/completions", {**SHORT, "compression": {"method": "none", "attention": ""}}, "compression.attention"),
        ("/v1/completions", {**SHORT, "max_tokens": True}, "max_tokens"),
        ("/v1/completions", {**SHORT, "stream": "yes"}, "stream"),
        ("/v1/completions", {**SHORT, "prompt": [1.5, 2.0]}, "prompt"),
        ("/v1/completions", {**SHORT, "seed": 1.5, "temperature": 0.5}, "seed"),
        ("/v1/completions", {**SHORT, "prompt": ""}, "prompt"),
        ("/v1/completions", {**SHORT, "best_of": 3}, "best_of"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
    ],
)
def test_lax_or_unsupported_values_are_400_naming_the_field(server_url: str, path: str, body: dict, param) -> None:
    error = error_of(httpx.post(f"{server_url}{path}", json=body, timeout=60), 400)
    assert error["param"] == param, error


def test_neutral_and_unknown_fields_are_accepted_and_logged(server_url: str, caplog) -> None:
    body = {**CHAT, "tools": [], "response_format": {"type": "text"}, "store": False, "x_custom": 1}
    with caplog.at_level(logging.INFO, logger="contract.protocol"):
        response = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert any("store, x_custom" in record.getMessage() for record in caplog.records), caplog.text


# ---- 6. errors quote input cut short ---------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {**SHORT, "compression": {"method": "m" * 500_000}},
        {**SHORT, "compression": {"method": "snapkv", "k" * 500_000: 1}},
        {**SHORT, "model": "q" * 500_000},
    ],
)
def test_errors_do_not_echo_huge_input(server_url: str, body: dict) -> None:
    response = httpx.post(f"{server_url}/v1/completions", json=body, timeout=60)
    assert response.status_code in (400, 404)
    assert len(response.content) < 2000, len(response.content)


# ---- 7. auth edges ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TEST_API_KEY}\xa0".encode("latin-1"),  # NBSP: str.strip() removed it
        f"Bearer \xa0{TEST_API_KEY}".encode("latin-1"),
        f"Bearer  {TEST_API_KEY}".encode(),
        f"Bearer{TEST_API_KEY}".encode(),
        TEST_API_KEY.encode(),
    ],
)
def test_only_the_exact_bearer_token_is_accepted(server_url_with_key: str, authorization: bytes) -> None:
    response = httpx.get(f"{server_url_with_key}/v1/models", headers={"Authorization": authorization})
    assert error_of(response, 401)["type"] == "authentication_error"


def test_exact_token_with_any_scheme_case_is_accepted(server_url_with_key: str) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {TEST_API_KEY}"}
        assert httpx.get(f"{server_url_with_key}/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("GET", "/v1/models/")],
)
def test_unknown_routes_and_methods_need_the_key_too(server_url_with_key: str, method: str, path: str) -> None:
    response = httpx.request(method, f"{server_url_with_key}{path}", headers={"Host": "evil.example"})
    assert error_of(response, 401)["code"] == "missing_api_key"
    keyed = httpx.request(method, f"{server_url_with_key}{path}", headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    assert keyed.status_code in (404, 405)  # never a 307 built from the Host header
    assert "location" not in keyed.headers


def test_ready_tells_details_only_with_the_key(server_url_with_key: str) -> None:
    anonymous = httpx.get(f"{server_url_with_key}/ready")
    assert anonymous.status_code == 200 and anonymous.json() == {"ready": True}
    keyed = httpx.get(f"{server_url_with_key}/ready", headers={"Authorization": f"Bearer {TEST_API_KEY}"}).json()
    assert keyed["ready"] is True and keyed["model"] and keyed["backend"] == "hf"


def test_api_key_file(engine, tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n", encoding="utf-8")
    with serve_app(make_test_app(engine, api_key_file=key_file)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-a-file"}).status_code == 200


# ---- 8. the OpenAPI document says what the server does ----------------------------------------
def test_openapi_lists_real_statuses_and_strict_shapes(server_url: str) -> None:
    schema = httpx.get(f"{server_url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        statuses = set(schema["paths"][path]["post"]["responses"])
        assert "422" not in statuses
        assert {"400", "413", "429", "500"} <= statuses
    schemas = schema["components"]["schemas"]
    tokenize = schemas["TokenizeRequest"]
    tokenize_shapes = tokenize["properties"]["prompt"]["anyOf"]  # text or ids, as /v1/completions; never null
    assert {"type": "string", "minLength": 1} in tokenize_shapes and {"type": "null"} not in tokenize_shapes
    assert tokenize["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]
    prompt_shapes = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt_shapes


def test_tokenize_null_fields_are_refused_as_the_schema_says(server_url: str) -> None:
    error_of(httpx.post(f"{server_url}/tokenize", json={"prompt": None, "messages": None}), 400)
    error_of(httpx.post(f"{server_url}/tokenize", json={"prompt": "a", "messages": [{"role": "user"}]}), 400)


# ---- 9. tokens decoded before a disconnect are counted -----------------------------------------
def test_generation_tokens_counted_when_the_client_leaves(server_url: str, engine) -> None:
    labels = {"model": engine.model_name, "backend": "hf", "method": "none"}
    name = "gemserve_generation_tokens_total"
    before = metric(scrape(server_url), name, **labels)
    body = {**SHORT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    received = 0
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received == 3:
                break  # leave mid-stream
    deadline = time.monotonic() + 60
    while (counted := metric(scrape(server_url), name, **labels) - before) < received:
        assert time.monotonic() < deadline, f"counted {counted} of at least {received} tokens"
        time.sleep(0.2)
    assert received <= counted < 200


# ---- issue 14: an invariant broken inside the engine is the server's fault ---------------------
@pytest.mark.parametrize("stream", [False, True])
def test_internal_value_error_is_500_with_the_request_id(server_url: str, engine, monkeypatch, caplog, stream) -> None:
    """A plain ``ValueError`` raised inside the engine was answered as a 400 invalid_request_error."""

    def broken_invariant(*args, **kwargs):
        raise ValueError("every KV head must keep the same number of entries")

    monkeypatch.setattr(engine.runner, "report", broken_invariant)
    with caplog.at_level(logging.ERROR):
        response = httpx.post(f"{server_url}/v1/completions", json={**SHORT, "stream": stream}, timeout=60)
    request_id = response.headers["X-Request-Id"]
    if stream:
        assert response.status_code == 200  # the status line went out before the engine ran
        payloads = [json.loads(p) for p in sse_events(response.text) if p != "[DONE]"]
        error = next(payload["error"] for payload in payloads if "error" in payload)
    else:
        error = error_of(response, 500)
    assert error["type"] == "internal_error"
    assert request_id in error["message"] and "KV head" not in error["message"]  # no internals leak
    failures = [r for r in caplog.records if request_id in r.getMessage()]
    assert failures and failures[0].exc_info and "KV head" in str(failures[0].exc_info[1])


# ---- issue 24: hardening, round two -----------------------------------------------------------
SURROGATE = "caf\ud800e"  # a lone UTF-16 surrogate: valid JSON, not valid Unicode text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "messages": [{"role": "user", "content": SURROGATE}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "system", "content": SURROGATE}, {"role": "user", "content": "hi"}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", {**CHAT, "stop": [SURROGATE]}, "stop.0"),
        ("/v1/completions", {**SHORT, "prompt": SURROGATE}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(server_url: str, path: str, body: dict, param: str) -> None:
    """Was a 500: the chat template raised a TypeError on text no UTF-8 holds."""
    content = json.dumps(body)  # ASCII with a \\ud800 escape, as a client's JSON encoder sends it
    response = httpx.post(f"{server_url}{path}", content=content, headers={"Content-Type": "application/json"})
    error = error_of(response, 400)
    assert error["param"] == param, error
    assert "surrogate (U+D800 at character 3)" in error["message"], error


METHODS = ("none", "gemfilter", "snapkv", "h2o", "streamingllm", "pyramidkv")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_every_tiny_prompt(server_url: str, method: str) -> None:
    """snapkv / pyramidkv without a budget were 500s on 2-32 token prompts (pooling over no prefix).
    Every prompt length 1..40, with and without a budget: an answer, or a 400 that says why."""
    statuses: dict[int, list[tuple[int, int | None]]] = {}
    with httpx.Client(base_url=server_url, timeout=60) as client:
        for length in range(1, 41):
            for budget in (None, 8):
                compression = {"method": method} | ({} if budget is None or method == "none" else {"budget": budget})
                body = {"prompt": list(range(100, 100 + length)), "max_tokens": 2, "temperature": 0}
                response = client.post("/v1/completions", json={**body, "compression": compression})
                statuses.setdefault(response.status_code, []).append((length, budget))
                if response.status_code == 400:
                    assert error_of(response, 400)["param"].startswith("compression"), response.text
                else:
                    assert response.status_code == 200, (length, budget, response.text)
    # Without a budget every length answers; a budget below the observation window is refused.
    assert all(budget == 8 for _, budget in statuses.get(400, [])), statuses.get(400)


@pytest.mark.parametrize(("method", "budget"), [(m, b) for m in METHODS[1:] for b in (64, 200)])
def test_kept_tokens_never_exceeds_the_budget(server_url: str, count_tokens, method: str, budget: int) -> None:
    """kept_tokens was the union over heads (snapkv budget 64 reported 219 of 546)."""
    prompt = "The lighthouse keeper logged every ship that passed the northern rocks at night. " * 39
    prompt_tokens = count_tokens(prompt)
    assert prompt_tokens > 500
    body = {**SHORT, "prompt": prompt, "compression": {"method": method, "budget": budget}}
    compression = httpx.post(f"{server_url}/v1/completions", json=body, timeout=120).json()["compression"]
    assert compression["kept_tokens"] <= budget, compression
    assert compression["ratio"] == pytest.approx(compression["kept_tokens"] / prompt_tokens)
    if method == "gemfilter":
        assert compression["kept_tokens_union"] is None  # the prompt's kept tokens are one set
        return
    assert compression["kept_tokens"] == budget  # every head holds the budget (PyramidKV: on average)
    assert compression["kept_tokens_union"] >= budget  # heads keep different positions
    # What the cache holds says the same: entries per head x heads x layers.
    assert compression["kv_bytes_after"] / compression["kv_bytes_before"] == pytest.approx(budget / prompt_tokens)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "hi", "temperature": NaN}', "temperature: Input should be a finite number"),
        ('{"prompt": "hi", "max_tokens": 1, "compression": {"ratio": Infinity}}', "compression.ratio"),
        ('{"prompt": "hi", "max_', "the request body is not valid JSON"),
        ("", "the request body is empty"),
    ],
)
def test_body_errors_say_what_is_wrong(server_url: str, content: str, expected: str) -> None:
    """NaN was 'less than or equal to 2'; truncated JSON named param '43'; an empty body 'Field required'."""
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{server_url}/v1/completions", content=content, headers=headers, timeout=60)
    error = error_of(response, 400)
    assert expected in error["message"], error
    if "body" in expected:
        assert error["param"] is None and "Content-Type: application/json" in error["message"]


def test_json_sent_as_text_plain_is_told_the_content_type(server_url: str) -> None:
    """Was 'Input should be a valid dictionary'."""
    headers = {"Content-Type": "text/plain"}
    response = httpx.post(f"{server_url}/v1/completions", content=json.dumps(SHORT), headers=headers, timeout=60)
    error = error_of(response, 400)
    assert "not a JSON object; send one JSON object with Content-Type: application/json" in error["message"]


def test_chat_over_length_names_messages(server_url: str, engine) -> None:
    content = "word " * (engine.max_model_len + 10)
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    error = error_of(httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=120), 400)
    assert error["param"] == "messages" and "longer than the model's context" in error["message"]


def test_queue_full_message_counts_what_the_limit_counts() -> None:
    """The 429 said '11 waiting' with max_queue=4: admitted requests wait until scheduled."""
    from server.engine.admission import Admission
    from server.engine.base import QueueFullError

    admission = Admission(slots=8, slots_name="max_concurrency", max_queue=4)
    admission.accepting = True
    tickets = [admission.admit(lambda: None) for _ in range(12)]
    tickets[0].start_running()
    with pytest.raises(QueueFullError) as refused:
        admission.admit(lambda: None)
    assert str(refused.value) == (
        "server is busy: 12 requests admitted, its limit of 12 (max_concurrency=8 running + max_queue=4 queued); "
        "retry later"
    )


def test_unknown_viewer_asset_is_a_json_404(server_url_with_key: str) -> None:
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    error = error_of(httpx.get(f"{server_url_with_key}/viewer/x", headers=headers), 404)
    assert "no viewer asset 'x'" in error["message"]


def test_tokenize_takes_the_token_ids_completions_takes(server_url: str, engine) -> None:
    ids = [100, 101, 102]
    assert httpx.post(f"{server_url}/tokenize", json={"prompt": ids}).json()["tokens"] == ids
    error = error_of(httpx.post(f"{server_url}/tokenize", json={"prompt": [len(engine.tokenizer)]}), 400)
    assert "outside the vocabulary" in error["message"] and error["param"] == "prompt"
    error_of(httpx.post(f"{server_url}/tokenize", json={"prompt": ""}), 400)
