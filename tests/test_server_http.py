"""Raw HTTP behaviour: SSE framing, request ids, error bodies, auth, /metrics, /tokenize."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_API_KEY

SHORT = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


# Every per-request histogram the server exports (tests/test_metrics_labels.py checks their labels).
HISTOGRAMS = (
    "gemserve_time_to_first_token_seconds",
    "gemserve_e2e_request_latency_seconds",
    "gemserve_selection_seconds",
    "gemserve_prompt_tokens",
    "gemserve_kept_tokens",
    "gemserve_kv_cache_bytes",
)


def sse_events(body: str) -> list[str]:
    """Split an SSE body into event payloads, asserting the exact ``data: ...\\n\\n`` framing."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    raw_events = body.split("\n\n")
    assert raw_events[-1] == ""
    payloads = []
    for event in raw_events[:-1]:
        assert event.startswith("data: "), event
        assert "\n" not in event, event
        payloads.append(event.removeprefix("data: "))
    return payloads


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_sse_framing_is_exact(server_url: str) -> None:
    payload = {**SHORT, "stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{server_url}/v1/completions", json=payload, timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert {"compression", "metrics"} <= set(chunks[-1])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    # usage rides only on the final chunk
    assert all("usage" not in c for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage(server_url: str) -> None:
    response = httpx.post(f"{server_url}/v1/completions", json={**SHORT, "stream": True}, timeout=120)
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert chunks[-1]["compression"]["method"] == "none"


def test_request_id_is_echoed_or_generated(server_url: str) -> None:
    sent = httpx.get(f"{server_url}/health", headers={"X-Request-Id": "my-trace.42"})
    assert sent.headers["x-request-id"] == "my-trace.42"
    generated = httpx.get(f"{server_url}/v1/models")
    assert len(generated.headers["x-request-id"]) == 32
    # error responses carry it too, and a hostile id is replaced, not echoed
    missing = httpx.get(f"{server_url}/nope", headers={"X-Request-Id": "bad id\twith spaces"})
    error_of(missing, 404)
    assert missing.headers["x-request-id"] != "bad id\twith spaces"


def test_invalid_field_is_400_naming_it(server_url: str) -> None:
    error = error_of(httpx.post(f"{server_url}/v1/completions", json={**SHORT, "temperature": 5}), 400)
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]
    error = error_of(httpx.post(f"{server_url}/v1/chat/completions", json={"max_tokens": 2}), 400)
    assert error["param"] == "messages"
    error = error_of(httpx.post(f"{server_url}/v1/completions", json={**SHORT, "n": 2}), 400)
    assert "n=1" in error["message"]


def test_invalid_json_is_400(server_url: str) -> None:
    response = httpx.post(
        f"{server_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert error_of(response, 400)["type"] == "invalid_request_error"


def test_unknown_method_and_knob_list_allowed(server_url: str) -> None:
    bad_method = {**SHORT, "compression": {"method": "zip"}}
    error = error_of(httpx.post(f"{server_url}/v1/completions", json=bad_method), 400)
    assert error["param"] == "compression.method"
    assert "allowed: none, gemfilter" in error["message"]
    bad_knob = {**SHORT, "compression": {"method": "gemfilter", "beta": 8}}
    error = error_of(httpx.post(f"{server_url}/v1/completions", json=bad_knob), 400)
    assert error["param"] == "compression.beta"
    assert "its knobs:" in error["message"] and "budget" in error["message"]


@pytest.mark.parametrize(
    ("compression", "param", "message"),
    [
        ({"attention": "flash3"}, "compression.attention", "allowed: dense, streaming, vertical_slash, block_sparse"),
        (
            {"attention": "block_sparse", "attention_knobs": {"gamma": 1}},
            "compression.attention_knobs.gamma",
            "its knobs:",
        ),
        ({"attention": 7}, "compression.attention", "string"),
        ({"method": "snapkv", "filter_attention": "streaming"}, "compression.filter_attention", "has no knob"),
        (
            {"method": "gemfilter", "filter_attention": "streaming", "filter_attention_knobs": {"window": -1}},
            "compression.filter_attention_knobs.window",
            ">= 1",
        ),
    ],
)
def test_bad_attention_backend_or_knob_is_400_naming_it(server_url: str, compression, param, message) -> None:
    response = httpx.post(f"{server_url}/v1/completions", json={**SHORT, "compression": compression})
    error = error_of(response, 400)
    assert error["param"] == param
    assert message in error["message"]


def test_attention_backend_is_reported_per_request(server_url: str) -> None:
    # A prompt of its own: one another test sent may be served from the prefix cache, and a
    # one-token prefill is a decode step (always SDPA, never counted).
    body = {
        **SHORT,
        "prompt": "A short prompt of a dozen tokens or so, for the attention report.",
        "compression": {"attention": "block_sparse", "attention_knobs": {"threshold": 0.5}},
    }
    compression = httpx.post(f"{server_url}/v1/completions", json=body).json()["compression"]
    assert compression["attention"]["backend"] == "block_sparse"
    assert compression["attention"]["knobs"]["threshold"] == 0.5
    # A short prompt gets no pattern (nothing worth skipping): computed densely, and said so.
    assert compression["attention"]["density"] == 1.0
    assert compression["attention"]["dense_layers"] > 0


def test_prompt_longer_than_context_states_both_lengths(server_url: str, engine) -> None:
    too_long = engine.max_model_len + 5
    payload = {"prompt": [1] * too_long, "max_tokens": 1}
    error = error_of(httpx.post(f"{server_url}/v1/completions", json=payload, timeout=60), 400)
    assert str(too_long) in error["message"] and str(engine.max_model_len) in error["message"]
    assert error["param"] == "prompt"


def test_token_ids_outside_vocabulary_are_400(server_url: str) -> None:
    error = error_of(httpx.post(f"{server_url}/v1/completions", json={"prompt": [1, 10**9], "max_tokens": 1}), 400)
    assert "vocabulary" in error["message"]


def test_unknown_model_is_404(server_url: str) -> None:
    error = error_of(httpx.post(f"{server_url}/v1/completions", json={**SHORT, "model": "gpt-9"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_api_key_guards_all_but_health_and_ready(server_url_with_key: str) -> None:
    url = server_url_with_key
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").json()["ready"] is True
    guarded = (
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/metrics",
        "/openapi.json",
        "/docs",
    )
    for path in guarded:
        method = "POST" if path in ("/v1/completions", "/v1/chat/completions", "/tokenize") else "GET"
        error = error_of(httpx.request(method, f"{url}{path}", json=SHORT), 401)
        assert error["type"] == "authentication_error" and error["code"] == "missing_api_key"
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["code"] == "invalid_api_key"
    key = {"Authorization": f"Bearer {TEST_API_KEY}"}
    assert httpx.get(f"{url}/v1/models", headers=key).status_code == 200
    assert httpx.get(f"{url}/openapi.json", headers=key).json()["info"]["title"] == "GemServe"


def test_tokenize_counts_like_the_engine(server_url: str, engine) -> None:
    body = httpx.post(f"{server_url}/tokenize", json={"prompt": "Hello there"}).json()
    assert body["tokens"] == engine.encode_prompt("Hello there")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.max_model_len
    messages = [{"role": "user", "content": "Hi"}]
    body = httpx.post(f"{server_url}/tokenize", json={"messages": messages}).json()
    assert body["tokens"] == engine.encode_chat(messages)
    error_of(httpx.post(f"{server_url}/tokenize", json={}), 400)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_per_request(server_url: str, engine) -> None:
    labels = {"model": engine.model_name, "backend": "hf", "method": "none"}
    before = scrape(server_url)
    response = httpx.post(f"{server_url}/v1/completions", json=SHORT, timeout=120).json()
    httpx.post(f"{server_url}/v1/completions", json={**SHORT, "compression": {"method": "zip"}})
    after = scrape(server_url)
    ok = "gemserve_requests_total"
    assert metric(after, ok, **labels, status="200") == metric(before, ok, **labels, status="200") + 1
    bad = {**labels, "method": "invalid", "status": "400"}
    assert metric(after, ok, **bad) == metric(before, ok, **bad) + 1
    tokens = "gemserve_generation_tokens_total"
    assert metric(after, tokens, **labels) - metric(before, tokens, **labels) == response["usage"]["completion_tokens"]
    for histogram in HISTOGRAMS:
        count = f"{histogram}_count"
        assert metric(after, count, **labels) == metric(before, count, **labels) + 1, histogram
    prompt_sum = "gemserve_prompt_tokens_sum"
    assert metric(after, prompt_sum, **labels) - metric(before, prompt_sum, **labels) == len(
        engine.encode_prompt("Hello")
    )
    gauge_labels = {"model": engine.model_name, "backend": "hf"}
    assert metric(after, "gemserve_requests_running", **gauge_labels) == 0
    assert metric(after, "gemserve_requests_waiting", **gauge_labels) == 0


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_openapi_docs_served(server_url: str, path: str) -> None:
    assert httpx.get(f"{server_url}{path}").status_code == 200


def test_tokenize_maps_developer_to_system_like_chat(server_url: str) -> None:
    messages = [{"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]
    counted = httpx.post(f"{server_url}/tokenize", json={"messages": messages}).json()["count"]
    chat = {"messages": messages, "max_tokens": 1, "temperature": 0}
    prefilled = httpx.post(f"{server_url}/v1/chat/completions", json=chat, timeout=120).json()["usage"]
    assert counted == prefilled["prompt_tokens"], f"/tokenize counted {counted}, chat prefilled {prefilled}"
