"""The SDK against the real app around a scripted engine (exact control over answers, 429s with
Retry-After, slow and failing generations: tests/fixtures/scripted_engine.py) and httpx mock
transports (exact bytes on the wire, statuses the server never sends), then against the real
server on the real model."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from fixtures.scripted_engine import API_KEY, MODEL, RETRY_AFTER_S, ScriptedEngine, serve_scripted
from pydantic import ValidationError

from clients import errors
from clients.sdk import AsyncGemServe, ChatCompletion, ChatCompletionChunk, Completion, GemServe, Stream
from contract.protocol import CompressionInfo, CompressionParams, MetricsInfo, ModelList

WORDS_8 = "".join(f" w{i}" for i in range(8))


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, ScriptedEngine]]:
    with serve_scripted() as served:
        yield served


class Wire:
    """What the SDK put on the wire: every request's JSON body and its arrival time, by request id."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrivals: dict[str, list[float]] = {}

    def record(self, request: httpx.Request) -> None:
        self.arrivals.setdefault(request.headers.get("x-request-id", ""), []).append(time.monotonic())
        if request.content:
            self.bodies.append(json.loads(request.content))


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def client(scripted: tuple[str, ScriptedEngine], wire: Wire) -> Iterator[GemServe]:
    http = httpx.Client(event_hooks={"request": [wire.record]})
    with GemServe(scripted[0], api_key=API_KEY, http_client=http) as c:
        yield c


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: object) -> GemServe:
    """A client whose every request goes to ``handler`` (an httpx client: openai takes those too)."""
    return GemServe("http://127.0.0.1:1", http_client=httpx.Client(transport=httpx.MockTransport(handler)), **kwargs)


def test_completion_is_openais_type_with_typed_compression(
    client: GemServe, scripted: tuple[str, ScriptedEngine], wire: Wire
) -> None:
    reply = client.completions.create(
        prompt="one two three four", max_tokens=8, compression=CompressionParams(method="gemfilter", budget=2)
    )
    assert isinstance(reply, Completion) and isinstance(reply, openai.types.Completion)
    assert reply.choices[0].text == WORDS_8
    assert reply.usage is not None and reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 8
    assert isinstance(reply.compression, CompressionInfo) and isinstance(reply.metrics, MetricsInfo)
    assert reply.compression.kept_tokens == 2 and reply.compression.ratio == 0.5
    assert reply.metrics.memory_source == "scripted"
    served = scripted[1].requests[-1]
    assert served.compression.method == "gemfilter" and served.compression.knobs == {"budget": 2}
    sent = wire.bodies[-1]
    assert sent["compression"] == {"method": "gemfilter", "budget": 2}  # only what the caller set
    assert "stream" not in sent and "model" not in sent  # server defaults are not overridden by the SDK


def test_chat_accepts_compression_dict_and_extra_body(
    client: GemServe, scripted: tuple[str, ScriptedEngine], wire: Wire
) -> None:
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "a b c"}],
        max_completion_tokens=3,
        compression={"method": "snapkv"},
        ignore_eos=True,
        extra_body={"seed": 7},
    )
    assert isinstance(reply, ChatCompletion) and isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.choices[0].message.content == " w0 w1 w2"
    assert reply.compression.method == "snapkv"
    served = scripted[1].requests[-1]
    assert served.sampling.ignore_eos is True and served.sampling.seed == 7 and served.sampling.max_tokens == 3
    sent = wire.bodies[-1]
    assert sent["messages"] == [{"role": "user", "content": "a b c"}]
    assert sent["compression"] == {"method": "snapkv"} and sent["ignore_eos"] is True and sent["seed"] == 7


def test_bad_compression_or_keyword_is_rejected_before_sending(client: GemServe, wire: Wire) -> None:
    with pytest.raises(ValidationError, match="budget"):
        client.completions.create(prompt="x", compression={"method": "gemfilter", "budget": "lots"})
    with pytest.raises(TypeError, match="max_token"):
        client.completions.create(prompt="x", max_token=3)
    assert wire.bodies == []


def test_chat_stream_yields_typed_chunks_and_final_extensions(client: GemServe, wire: Wire) -> None:
    with client.chat.completions.create(
        messages=[{"role": "user", "content": "a b c d e"}],
        max_tokens=8,
        stream=True,
        compression={"method": "snapkv", "budget": 3},
    ) as stream:
        assert isinstance(stream, Stream) and isinstance(stream, openai.Stream)
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == WORDS_8
    assert stream.text == WORDS_8 and stream.finish_reason == "length"
    assert stream.usage.completion_tokens == 8 and stream.usage.prompt_tokens == 5
    assert isinstance(chunks[-1].compression, CompressionInfo)  # typed on the final chunk itself, too
    assert stream.compression.kept_tokens == 3 and stream.metrics.memory_source == "scripted"
    assert stream.response.is_closed and stream.request_id.startswith("req-")
    assert wire.bodies[-1]["stream_options"] == {"include_usage": True}  # asked for by default


def test_completion_stream(client: GemServe) -> None:
    stream = client.completions.create(prompt="a b", max_tokens=4, stream=True)
    texts = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert texts == [" w0", " w1", " w2", " w3", ""]  # the last chunk carries the finish reason
    assert stream.usage.total_tokens == 6


def test_models_health_ready_tokenize_metrics(client: GemServe) -> None:
    models = client.models()
    assert isinstance(models, ModelList) and models.data[0].max_model_len == 8192
    assert [m.id for m in client.models.list()] == [MODEL]  # openai's own call still works
    assert client.health() == {"status": "ok"}
    assert client.ready() is True
    tokens = client.tokenize(messages=[{"role": "user", "content": "x y z"}])
    assert tokens.count == 3 and len(tokens.tokens) == 3
    assert client.tokenize("p q").count == 2
    before = client.metrics().value("gemserve_requests_total", method="gemfilter", status="200") or 0.0
    client.completions.create(prompt="a b c", max_tokens=1, compression={"method": "gemfilter"})
    snapshot = client.metrics()
    assert "gemserve_requests" in snapshot  # counters lose their _total in the family name
    assert snapshot.value("gemserve_requests_total", method="gemfilter", status="200") == before + 1
    assert snapshot.value("gemserve_requests_running") == 0.0
    assert snapshot.value("gemserve_requests_total", method="h2o") is None


def test_ready_is_false_while_the_model_loads() -> None:
    engine = ScriptedEngine()
    engine.release = threading.Event()
    try:
        with serve_scripted(engine, wait_ready=False) as (url, _), GemServe(url, api_key=API_KEY) as c:
            assert c.health() == {"status": "ok"} and c.ready() is False
            with pytest.raises(errors.InternalServerError) as caught:  # 503: not ready
                c.with_options(max_retries=0).completions.create(prompt="x")
            assert caught.value.status_code == 503
            engine.release.set()  # before the server stops: its shutdown waits for the loading thread
            deadline = time.monotonic() + 30
            while not c.ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.ready() is True
    finally:
        engine.release.set()


@pytest.mark.parametrize(
    ("prompt", "status", "error_class", "message"),
    [
        ("x", 400, errors.BadRequestError, "budget"),  # compression: snapkv with budget 0
        ("flaky:9", 429, errors.RateLimitError, "queue full"),
        ("fail", 500, errors.InternalServerError, "internal"),
    ],
)
def test_the_servers_errors_map_to_openais_classes(
    client: GemServe, prompt: str, status: int, error_class: type, message: str
) -> None:
    compression = {"method": "snapkv", "budget": 0} if status == 400 else None
    with pytest.raises(error_class) as caught:
        client.with_options(max_retries=0).completions.create(
            prompt=prompt, compression=compression, extra_headers={"X-Request-Id": f"r-{status}"}
        )
    error = caught.value
    assert isinstance(error, errors.APIStatusError) and isinstance(error, errors.GemServeError)
    assert error.status_code == status and message in error.message.lower()
    assert error.request_id == f"r-{status}"
    assert error.body["message"] and error.body["type"] == error.type  # body: the server's "error" object


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
def test_every_status_maps_to_its_error_class(status: int, error_class: type) -> None:
    """Statuses GemServe never sends (403, 422) too: the SDK talks to other OpenAI servers."""
    body = {"error": {"message": f"says {status}", "type": "some_error", "param": None, "code": status}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers={"x-request-id": request.headers["x-request-id"]})

    with mock_client(handler, max_retries=0) as c, pytest.raises(error_class) as caught:
        c.completions.create(prompt="x", extra_headers={"X-Request-Id": "r-1"})
    error = caught.value
    assert error.status_code == status and error.message == f"Error code: {status} - says {status}"
    assert error.request_id == "r-1" and error.body["type"] == "some_error" == error.type


def test_error_names_are_openais_classes() -> None:
    assert errors.GemServeError is openai.OpenAIError and errors.RateLimitError is openai.RateLimitError
    assert errors.StreamError is openai.APIError and errors.APITimeoutError is openai.APITimeoutError


def test_wrong_api_key_is_authentication_error(scripted: tuple[str, ScriptedEngine]) -> None:
    with GemServe(scripted[0], api_key="wrong") as c, pytest.raises(errors.AuthenticationError, match="API key"):
        c.models()


def test_retries_honour_retry_after_with_one_request_id(
    client: GemServe, scripted: tuple[str, ScriptedEngine], wire: Wire
) -> None:
    reply = client.completions.create(prompt="flaky:2", max_tokens=2, extra_headers={"X-Request-Id": "flaky-ok"})
    assert reply.choices[0].text == " w0 w1"
    assert scripted[1].attempts["flaky-ok"] == 3  # two 429s, then the answer, all under one id
    arrivals = wire.arrivals["flaky-ok"]
    assert len(arrivals) == 3
    assert all(later - earlier >= RETRY_AFTER_S for earlier, later in itertools.pairwise(arrivals))


def test_retries_give_up_after_max_retries(client: GemServe, scripted: tuple[str, ScriptedEngine]) -> None:
    with pytest.raises(errors.RateLimitError):
        client.with_options(max_retries=1).completions.create(
            prompt="flaky:5", extra_headers={"X-Request-Id": "flaky-no"}
        )
    assert scripted[1].attempts["flaky-no"] == 2


def test_client_bad_request_is_not_retried(client: GemServe, wire: Wire) -> None:
    with pytest.raises(errors.BadRequestError):
        client.completions.create(
            prompt="x", compression={"method": "snapkv", "budget": 0}, extra_headers={"X-Request-Id": "once"}
        )
    assert len(wire.arrivals["once"]) == 1


def test_connection_and_timeout_errors(client: GemServe) -> None:
    with GemServe("http://127.0.0.1:9", max_retries=0) as dead, pytest.raises(errors.APIConnectionError):
        dead.health()
    with pytest.raises(errors.APITimeoutError):
        client.with_options(max_retries=0).completions.create(prompt="sleep:2", timeout=0.2)


def test_base_url_and_key_from_env(monkeypatch: pytest.MonkeyPatch, scripted: tuple[str, ScriptedEngine]) -> None:
    url = scripted[0]
    monkeypatch.setenv("GEMSERVE_BASE_URL", url + "/v1/")
    monkeypatch.setenv("GEMSERVE_API_KEY", API_KEY)
    with GemServe() as c:
        assert c.root_url == url and str(c.base_url) == url + "/v1/"
        assert c.models().data[0].id == MODEL
        assert c.with_options(timeout=5).root_url == url  # openai's copy keeps GemServe's target
    with pytest.raises(ValueError, match="http"):
        GemServe("localhost:8000")


def test_without_a_key_no_authorization_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyless client works (openai's would refuse), and never sends $OPENAI_API_KEY / $OPENAI_ADMIN_KEY."""
    monkeypatch.delenv("GEMSERVE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-secret")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    with mock_client(handler) as c:
        assert c.health() == {"status": "ok"}
        c.completions.create(prompt="x")
    assert all("authorization" not in request.headers for request in seen) and len(seen) == 2


def test_async_client_calls_streams_and_retries(scripted: tuple[str, ScriptedEngine]) -> None:
    async def scenario() -> None:
        async with AsyncGemServe(scripted[0], api_key=API_KEY) as c:
            reply = await c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert isinstance(reply, ChatCompletion) and reply.choices[0].message.content == " w0 w1"
            stream = await c.completions.create(
                prompt="a b c", max_tokens=3, stream=True, compression={"method": "h2o", "budget": 1}
            )
            async with stream:
                texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
            assert texts == [" w0", " w1", " w2", ""] and stream.compression.kept_tokens == 1
            retried = await c.completions.create(prompt="flaky:1", max_tokens=1, extra_headers={"X-Request-Id": "a1"})
            assert retried.choices[0].text == " w0"
            with pytest.raises(errors.NotFoundError):
                await c.completions.create(prompt="x", model="no-such-model")
            assert (await c.tokenize("a b")).count == 2 and await c.ready()
            assert (await c.models()).data[0].id == MODEL
            assert (await c.metrics()).value("gemserve_requests_running") == 0.0

    asyncio.run(scenario())
    assert scripted[1].attempts["a1"] == 2


# ---- the wire, through a mock transport ----------------------------------------------------------
CHUNK = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [{"index": 0, "text": "hi"}]}


def sse_client(body: bytes | httpx.SyncByteStream) -> GemServe:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream", "x-request-id": "r-sse"}
        if isinstance(body, bytes):
            return httpx.Response(200, content=body, headers=headers)
        return httpx.Response(200, stream=body, headers=headers)

    return mock_client(handler, max_retries=0)


def test_sse_joins_data_lines_and_skips_comments() -> None:
    first, second = json.dumps(CHUNK)[:20], json.dumps(CHUNK)[20:]
    body = f": keep-alive\n\nevent: message\ndata: {first}\ndata: {second}\n\ndata: [DONE]\n\n".encode()
    with sse_client(body) as c:
        stream = c.completions.create(prompt="x", stream=True)
        assert [chunk.choices[0].text for chunk in stream] == ["hi"] and stream.request_id == "r-sse"


def test_error_event_inside_stream_raises() -> None:
    body = b'data: {"error": {"message": "engine died", "type": "internal"}}\n\ndata: [DONE]\n\n'
    with sse_client(body) as c, pytest.raises(errors.StreamError, match="engine died"):
        list(c.chat.completions.create(messages=[{"role": "user", "content": "x"}], stream=True))


def test_stream_without_done_still_ends() -> None:
    """The server closed without ``[DONE]``: the stream ends; an event cut off before its blank line is
    dropped, as the SSE spec says."""
    body = f"data: {json.dumps(CHUNK)}\n\ndata: {json.dumps(CHUNK)}\n\ndata: {json.dumps(CHUNK)}".encode()
    with sse_client(body) as c:
        stream = c.completions.create(prompt="x", stream=True)
        assert [chunk.choices[0].text for chunk in stream] == ["hi", "hi"] and stream.text == "hihi"
        assert stream.response.is_closed


class StallingBody(httpx.SyncByteStream):
    """One event, then the read times out: a server that stalls mid-stream."""

    def __iter__(self) -> Iterator[bytes]:
        yield f"data: {json.dumps(CHUNK)}\n\n".encode()
        raise httpx.ReadTimeout("stalled")


def test_a_stream_that_stalls_raises_the_sdk_timeout_error() -> None:
    with sse_client(StallingBody()) as c:
        stream = c.completions.create(prompt="x", stream=True)
        assert next(stream).choices[0].text == "hi"
        with pytest.raises(errors.APITimeoutError):
            next(stream)


def test_connection_errors_are_retried_with_one_request_id() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["x-request-id"])
        if len(seen) % 3:  # the first two attempts of each call fail
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"status": "ok", **CHUNK})

    with mock_client(handler) as c:
        assert c.health()["status"] == "ok"  # a GET route
        assert c.completions.create(prompt="x").choices[0].text == "hi"  # openai's POST
        assert len(seen) == 6 and len(set(seen[:3])) == len(set(seen[3:])) == 1 and seen[0] != seen[3]
        seen.clear()
        with pytest.raises(errors.APIConnectionError):
            c.with_options(max_retries=1).health()
        assert len(seen) == 2


def test_malformed_success_body_is_a_validation_error() -> None:
    client = mock_client(lambda request: httpx.Response(200, json={"object": "list"}))
    with client, pytest.raises(errors.APIResponseValidationError, match="ModelList"):
        client.models()


def test_importing_the_clients_imports_no_torch_and_no_server_module() -> None:
    code = (
        "import sys, clients.sdk, clients.loadtest\n"  # and the loadtest_* parts
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'server', 'evals')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
        assert caught.value.message == f"Error code: 400 - {caught.value.body['message']}"
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
