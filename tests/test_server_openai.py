"""The official ``openai`` client (sync and async) against a real GemServe on the default model."""

from __future__ import annotations

import asyncio

import openai
import pytest

from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

CHAT = [{"role": "user", "content": "Name one colour of the sky."}]
PROMPT = "The capital of France is"
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def direct_text(engine, prompt_ids: list[int], method: str = "none", **knobs) -> str:
    """What the engine answers without HTTP (greedy): the server must return exactly this."""
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        compression=CompressionSpec(method=method, knobs=knobs),
    )
    return engine.generate(request).text


def check_extensions(extra: dict, method: str, prompt_tokens: int) -> None:
    compression, metrics = extra["compression"], extra["metrics"]
    assert compression["method"] == method
    assert compression["prompt_tokens"] == prompt_tokens
    assert 0 < compression["kept_tokens"] <= prompt_tokens
    assert compression["ratio"] == pytest.approx(compression["kept_tokens"] / prompt_tokens, abs=1e-6)
    assert 0 < metrics["ttft_ms"] <= metrics["e2e_ms"]
    assert metrics["prefill_ms"] > 0
    assert metrics["kv_cache_bytes"] > 0
    assert metrics["memory_source"]


def test_models_list_reports_context(client: openai.OpenAI, engine) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [engine.model_name]
    assert models[0].model_extra["max_model_len"] == engine.max_model_len


def test_chat_sync_with_gemfilter(client: openai.OpenAI, model_name: str, engine) -> None:
    prompt_ids = engine.encode_chat(CHAT)
    budget = len(prompt_ids) // 4  # short enough for the filter pass to pay (payoff_ratio)
    response = client.chat.completions.create(
        model=model_name,
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"compression": {"method": "gemfilter", "budget": budget}},
    )
    assert response.object == "chat.completion"
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= response.usage.completion_tokens <= MAX_TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    check_extensions(response.model_extra, "gemfilter", len(prompt_ids))
    assert response.model_extra["compression"]["kept_tokens"] == budget
    assert response.choices[0].message.content == direct_text(engine, prompt_ids, "gemfilter", budget=budget)


def test_completion_sync_none_matches_engine(client: openai.OpenAI, model_name: str, engine) -> None:
    prompt_ids = engine.encode_prompt(PROMPT)
    response = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"compression": {"method": "none"}},
    )
    assert response.usage.prompt_tokens == len(prompt_ids)
    check_extensions(response.model_extra, "none", len(prompt_ids))
    assert response.model_extra["compression"]["kept_tokens"] == len(prompt_ids)
    assert response.choices[0].text == direct_text(engine, prompt_ids)
    assert response.choices[0].finish_reason in ("length", "stop")


def test_completion_stream_sync(client: openai.OpenAI, model_name: str, engine) -> None:
    prompt_ids = engine.encode_prompt(PROMPT)
    stream = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == direct_text(engine, prompt_ids)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == len(prompt_ids)
    check_extensions(last.model_extra, "none", len(prompt_ids))


def test_chat_stream_async_with_compression(server_url: str, model_name: str, engine) -> None:
    prompt_ids = engine.encode_chat(CHAT)
    budget = len(prompt_ids) // 4  # short enough for the filter pass to pay (payoff_ratio)

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=model_name,
                messages=CHAT,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"compression": {"method": "gemfilter", "budget": budget}},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct_text(engine, prompt_ids, "gemfilter", budget=budget)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= usage_chunk.usage.completion_tokens <= MAX_TOKENS
    check_extensions(usage_chunk.model_extra, "gemfilter", len(prompt_ids))
    assert usage_chunk.model_extra["compression"]["kept_tokens"] == budget


def test_chat_async_not_streamed(server_url: str, model_name: str, engine) -> None:
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as client:
            return await client.chat.completions.create(
                model=model_name, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0
            )

    response = asyncio.run(run())
    prompt_ids = engine.encode_chat(CHAT)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.choices[0].message.content == direct_text(engine, prompt_ids)
    check_extensions(response.model_extra, "none", len(prompt_ids))


def test_openai_client_sees_400_for_unknown_method(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=1, extra_body={"compression": {"method": "zip"}}
        )
    assert "allowed: none, gemfilter" in info.value.message
    assert info.value.body["param"] == "compression.method"
