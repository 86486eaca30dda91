"""The SDK against a stub OpenAI-style server (exact control over statuses, Retry-After, streams)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from fixtures.stub_app import API_KEY, RETRY_AFTER_S, create_stub_app, serve_in_thread
from pydantic import ValidationError

from clients import errors
from clients._base import MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S, RETRY_JITTER, retry_delay
from clients.sdk import AsyncGemServe, GemServe
from clients.streaming import SSEDecoder, Stream
from server.protocol import ChatCompletionChunk, CompletionChunk, CompletionResponse, CompressionParams

WORDS_8 = "".join(f" w{i}" for i in range(8))


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[str, object]]:
    app = create_stub_app()
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture
def client(stub: tuple[str, object]) -> Iterator[GemServe]:
    with GemServe(stub[0], api_key=API_KEY) as c:
        yield c


def test_completion_is_typed_and_carries_compression(client: GemServe, stub: tuple[str, object]) -> None:
    reply = client.completions.create(
        prompt="one two three four", max_tokens=8, compression=CompressionParams(method="gemfilter", budget=2)
    )
    assert isinstance(reply, CompletionResponse)
    assert reply.choices[0].text == WORDS_8
    assert reply.usage is not None and reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 8
    assert reply.compression is not None and reply.compression.kept_tokens == 2 and reply.compression.ratio == 0.5
    assert reply.metrics is not None and reply.metrics.memory_source == "stub"
    sent = stub[1].state.stub.bodies[-1]
    assert sent["compression"] == {"method": "gemfilter", "budget": 2}  # only what the caller set
    assert "stream" not in sent  # server defaults are not overridden by the SDK


def test_chat_accepts_compression_dict(client: GemServe, stub: tuple[str, object]) -> None:
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "a b c"}], max_completion_tokens=3, compression={"method": "snapkv"}
    )
    assert reply.choices[0].message.content == " w0 w1 w2"
    assert reply.compression.method == "snapkv"
    assert stub[1].state.stub.bodies[-1]["messages"] == [{"role": "user", "content": "a b c"}]


def test_bad_compression_or_keyword_is_rejected_before_sending(client: GemServe) -> None:
    with pytest.raises(ValidationError, match="budget"):
        client.completions.create(prompt="x", compression={"method": "gemfilter", "budget": "lots"})
    with pytest.raises(TypeError, match="max_token"):
        client.completions.create(prompt="x", max_token=3)  # type: ignore[call-overload]


def test_chat_stream_yields_typed_chunks_and_final_extensions(client: GemServe) -> None:
    with client.chat.completions.create(
        messages=[{"role": "user", "content": "a b c d e"}], max_tokens=8, stream=True, compression={"budget": 3}
    ) as stream:
        assert isinstance(stream, Stream)
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == WORDS_8
    assert stream.text == WORDS_8 and stream.finish_reason == "length"
    assert stream.usage.completion_tokens == 8 and stream.usage.prompt_tokens == 5
    assert stream.compression.kept_tokens == 3 and stream.metrics.ttft_ms == 3.0
    assert stream.done and stream.response.is_closed


def test_completion_stream(client: GemServe) -> None:
    stream = client.completions.create(prompt="a b", max_tokens=4, stream=True)
    texts = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert texts == [" w0", " w1", " w2", " w3"]
    assert stream.usage.total_tokens == 6


def test_models_health_ready_tokenize_metrics(client: GemServe, stub: tuple[str, object]) -> None:
    assert [m.id for m in client.models().data] == ["stub-model"]
    assert client.health() == {"status": "ok"}
    assert client.ready() is True
    stub[1].state.stub.not_ready = True
    try:
        assert client.ready() is False
    finally:
        stub[1].state.stub.not_ready = False
    tokens = client.tokenize(messages=[{"role": "user", "content": "x y z"}])
    assert tokens.count == 3 and tokens.tokens == [0, 1, 2]
    assert client.tokenize("p q").count == 2
    snapshot = client.metrics()
    assert "gemserve_requests" in snapshot  # counters lose their _total in the family name
    assert snapshot.value("gemserve_requests_total", method="gemfilter") == 2.0
    assert snapshot.value("gemserve_queue_depth") == 0.0
    assert snapshot.value("gemserve_requests_total", method="h2o") is None


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, errors.BadRequestError),
        (403, errors.PermissionDeniedError),
        (404, errors.NotFoundError),
        (422, errors.UnprocessableEntityError),
        (429, errors.RateLimitError),
        (500, errors.InternalServerError),
        (503, errors.InternalServerError),
    ],
)
def test_status_maps_to_error_class(client: GemServe, status: int, error_class: type) -> None:
    with pytest.raises(error_class) as caught:
        client.completions.create(prompt=f"status:{status}", max_retries=0, extra_headers={"X-Request-Id": "r-1"})
    error = caught.value
    assert isinstance(error, errors.APIStatusError) and isinstance(error, errors.GemServeError)
    assert error.status_code == status and error.message == f"stub says {status}"
    assert error.request_id == "r-1"
    assert error.body["error"]["type"] == "stub_error"


def test_wrong_api_key_is_authentication_error(stub: tuple[str, object]) -> None:
    with GemServe(stub[0], api_key="wrong") as c, pytest.raises(errors.AuthenticationError, match="invalid API key"):
        c.models()


def test_retries_honour_retry_after_with_one_request_id(client: GemServe, stub: tuple[str, object]) -> None:
    state = stub[1].state.stub
    reply = client.completions.create(prompt="flaky:2", max_tokens=2, extra_headers={"X-Request-Id": "flaky-ok"})
    assert reply.choices[0].text == " w0 w1"
    assert state.attempts["flaky-ok"] == 3  # two 429s, then the answer, all under one id
    arrivals = state.arrivals["flaky-ok"]
    assert all(later - earlier >= RETRY_AFTER_S for earlier, later in itertools.pairwise(arrivals))


def test_retries_give_up_after_max_retries(client: GemServe, stub: tuple[str, object]) -> None:
    with pytest.raises(errors.RateLimitError):
        client.completions.create(prompt="flaky:5", max_retries=1, extra_headers={"X-Request-Id": "flaky-no"})
    assert stub[1].state.stub.attempts["flaky-no"] == 2


def test_client_bad_request_is_not_retried(client: GemServe, stub: tuple[str, object]) -> None:
    with pytest.raises(errors.BadRequestError):
        client.completions.create(prompt="status:400", extra_headers={"X-Request-Id": "once"})
    assert stub[1].state.stub.attempts["once"] == 1


def test_connection_and_timeout_errors(client: GemServe) -> None:
    with GemServe("http://127.0.0.1:9", max_retries=0) as dead, pytest.raises(errors.APIConnectionError):
        dead.health()
    with pytest.raises(errors.APITimeoutError):
        client.completions.create(prompt="sleep:2", timeout=0.2, max_retries=0)


def test_base_url_and_key_from_env(monkeypatch: pytest.MonkeyPatch, stub: tuple[str, object]) -> None:
    monkeypatch.setenv("GEMSERVE_BASE_URL", stub[0] + "/v1/")
    monkeypatch.setenv("GEMSERVE_API_KEY", API_KEY)
    with GemServe() as c:
        assert c.base_url == stub[0]
        assert c.models().data[0].id == "stub-model"
    with pytest.raises(ValueError, match="http"):
        GemServe("localhost:8000")


def test_async_client_calls_streams_and_retries(stub: tuple[str, object]) -> None:
    async def scenario() -> None:
        async with AsyncGemServe(stub[0], api_key=API_KEY) as c:
            reply = await c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert reply.choices[0].message.content == " w0 w1"
            stream = await c.completions.create(prompt="a b c", max_tokens=3, stream=True, compression={"budget": 1})
            async with stream:
                texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
            assert texts == [" w0", " w1", " w2"] and stream.compression.kept_tokens == 1
            retried = await c.completions.create(prompt="flaky:1", max_tokens=1, extra_headers={"X-Request-Id": "a1"})
            assert retried.choices[0].text == " w0"
            with pytest.raises(errors.NotFoundError):
                await c.completions.create(prompt="status:404")
            assert (await c.tokenize("a b")).count == 2 and await c.ready()
            assert (await c.metrics()).value("gemserve_queue_depth") == 0.0

    asyncio.run(scenario())
    assert stub[1].state.stub.attempts["a1"] == 2


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "event: message", 'data: {"a":', "data: 1}", "", "data: [DONE]", ""]
    events = [event for line in lines if (event := decoder.feed(line)) is not None]
    assert [(e.event, e.data) for e in events] == [("message", '{"a":\n1}'), (None, "[DONE]")]


def test_error_event_inside_stream_raises() -> None:
    body = b'data: {"error": {"message": "engine died", "type": "internal"}}\n\n'
    response = httpx.Response(200, content=body, request=httpx.Request("POST", "http://x"))
    with pytest.raises(errors.StreamError, match="engine died"):
        list(Stream(response, ChatCompletionChunk, "r"))


def test_stream_without_done_or_trailing_blank_line_still_ends() -> None:
    chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [{"text": "hi"}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(chunk)}".encode()
    response = httpx.Response(200, content=body, request=httpx.Request("POST", "http://x"))
    stream = Stream(response, CompletionChunk, "r")
    assert [c.choices[0].text for c in stream] == ["hi", "hi"] and stream.text == "hihi" and not stream.done


class StallingBody(httpx.SyncByteStream):
    """One event, then the read times out: a server that stalls mid-stream."""

    def __iter__(self) -> Iterator[bytes]:
        chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [{"text": "hi"}]}
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        raise httpx.ReadTimeout("stalled")


def test_a_stream_that_stalls_raises_the_sdk_timeout_error() -> None:
    response = httpx.Response(200, stream=StallingBody(), request=httpx.Request("POST", "http://x"))
    stream = Stream(response, CompletionChunk, "r-stall")
    assert next(stream).choices[0].text == "hi"
    with pytest.raises(errors.APITimeoutError) as caught:
        next(stream)
    assert caught.value.request_id == "r-stall"


def test_connection_errors_are_retried_with_one_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["x-request-id"])
        if len(seen) <= 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setattr("clients.sdk.retry_delay", lambda attempt, headers=None: 0.0)
    with GemServe("http://127.0.0.1:1", http_client=httpx.Client(transport=httpx.MockTransport(handler))) as c:
        assert c.health() == {"status": "ok"}
        assert len(seen) == 3 and len(set(seen)) == 1
        seen.clear()
        with pytest.raises(errors.APIConnectionError):
            c.health(max_retries=1)
        assert len(seen) == 2


def test_malformed_success_body_is_a_validation_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"object": "list"}))
    client = GemServe("http://127.0.0.1:1", http_client=httpx.Client(transport=transport))
    with client, pytest.raises(errors.APIResponseValidationError, match="ModelList"):
        client.models()


def test_retry_delay_policy() -> None:
    assert retry_delay(0, {"Retry-After": "3"}) == 3.0
    assert retry_delay(0, {"retry-after-ms": "250"}) == 0.25
    # A Retry-After beyond the ceiling falls back to capped, jittered exponential backoff.
    too_long = str(MAX_RETRY_AFTER_S + 1)
    assert MAX_RETRY_DELAY_S * (1 - RETRY_JITTER) <= retry_delay(10, {"Retry-After": too_long}) <= MAX_RETRY_DELAY_S
    first = [retry_delay(0) for _ in range(50)]
    assert all(0.5 * (1 - RETRY_JITTER) <= d <= 0.5 for d in first) and len(set(first)) > 1


def test_importing_the_clients_does_not_import_torch() -> None:
    code = "import sys, clients.sdk, clients.loadtest, clients.loadtest_report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- against the real server (tests/conftest.py: uvicorn in a thread, the real model) -------------
SHORT_PROMPT = "Paris is the capital of France. Berlin is the capital of Germany. What is the capital of France?"


def test_live_every_plain_call(server_url: str, engine: object) -> None:
    with GemServe(server_url) as c:
        assert c.health() == {"status": "ok"} and c.ready() is True
        card = c.models().data[0]
        assert card.id == "smollm2-135m-instruct" and card.max_model_len == 8192
        tokens = c.tokenize("hello world")
        assert tokens.tokens == engine.encode_prompt("hello world") and tokens.count == len(tokens.tokens)
        chat_ids = engine.encode_chat([{"role": "user", "content": "hi"}])
        assert c.tokenize(messages=[{"role": "user", "content": "hi"}]).tokens == chat_ids
        assert "gemserve_requests" in c.metrics()


def test_live_stream_matches_plain_answer_and_carries_compression(server_url: str) -> None:
    messages = [{"role": "user", "content": SHORT_PROMPT}]
    compression = CompressionParams(method="gemfilter", budget=16)
    with GemServe(server_url) as c:
        plain = c.chat.completions.create(
            messages=messages, max_tokens=4, temperature=0, ignore_eos=True, compression=compression
        )
        stream = c.chat.completions.create(
            messages=messages, max_tokens=4, temperature=0, ignore_eos=True, compression=compression, stream=True
        )
        with stream:
            chunks = list(stream)
    assert plain.usage.completion_tokens == 4
    assert plain.compression.method == "gemfilter" and plain.compression.kept_tokens == 16
    assert plain.compression.prompt_tokens == plain.usage.prompt_tokens > 16
    assert plain.metrics.ttft_ms > 0 and plain.metrics.memory_source
    # Greedy decoding of the same compressed prompt: streaming changes transport, not tokens.
    assert stream.text == plain.choices[0].message.content
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert stream.usage == plain.usage and stream.finish_reason == "length"
    assert stream.compression.kept_tokens == 16 and stream.metrics.prefill_ms > 0


def test_live_completion_and_errors(server_url: str, server_url_with_key: str) -> None:
    from conftest import TEST_API_KEY

    with GemServe(server_url) as c:
        reply = c.completions.create(prompt="The capital of France is", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens <= 2 and reply.compression.method == "none"
        with pytest.raises(errors.BadRequestError, match="allowed: none, gemfilter") as caught:
            c.completions.create(prompt="x", max_tokens=1, compression={"method": "bogus"})
        assert caught.value.status_code == 400 and caught.value.request_id
        assert caught.value.body["error"]["message"] == caught.value.message
    with GemServe(server_url_with_key, api_key="wrong") as c, pytest.raises(errors.AuthenticationError):
        c.models()
    with GemServe(server_url_with_key, api_key=TEST_API_KEY) as c:
        assert c.models().data[0].id == "smollm2-135m-instruct"


def test_live_async_stream(server_url: str) -> None:
    async def scenario() -> tuple[str, int]:
        async with AsyncGemServe(server_url) as c:
            stream = await c.completions.create(
                prompt="One, two, three,", max_tokens=3, temperature=0, ignore_eos=True, stream=True
            )
            pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
            return "".join(pieces), stream.usage.completion_tokens

    text, tokens = asyncio.run(scenario())
    assert tokens == 3 and text.strip()
