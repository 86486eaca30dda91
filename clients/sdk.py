"""The GemServe Python SDK: ``GemServe`` and ``AsyncGemServe``, the official ``openai`` clients with
GemServe's extensions.

    with GemServe() as client:                      # GEMSERVE_BASE_URL / GEMSERVE_API_KEY or args
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": long_text}],
            compression={"method": "gemfilter", "budget": 1024},
        )
        print(reply.choices[0].message.content, reply.compression.kept_tokens)

Transport, retries, timeouts, errors and server-sent events are openai's. GemServe adds:
``compression=`` (validated, then sent in the body) and ``ignore_eos=`` on ``create()``; a ``model``
that may be left out; typed ``compression`` / ``metrics`` (``contract/protocol.py``'s models) on
responses and on a stream's final chunk, which ``stream_options.include_usage`` asks for by
default; one ``X-Request-Id`` for every attempt of a call; and the routes outside ``/v1``:
``tokenize``, ``health``, ``ready``, ``metrics``, plus ``models()`` as GemServe's typed list.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, ClassVar, TypeVar

import httpx2
import openai
from openai import resources
from openai.types import Completion as OpenAICompletion
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ValidationError

from clients.config import resolve_api_key, resolve_base_url
from contract.protocol import CompressionInfo, CompressionParams, MetricsInfo, ModelList, TokenizeResponse

__all__ = [
    "AsyncGemServe",
    "AsyncStream",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "GemServe",
    "MetricsSnapshot",
    "Stream",
]

REQUEST_ID_HEADER = "X-Request-Id"
CompressionLike = CompressionParams | Mapping[str, Any] | None
MessageLike = Mapping[str, Any]
ModelT = TypeVar("ModelT", bound=BaseModel)


# ---- response types: openai's, with GemServe's fields typed -----------------------------------
class GemServeFields(openai.BaseModel):
    """GemServe's fields on a response and on a stream's final chunk (``None`` from other servers)."""

    compression: CompressionInfo | None = None
    metrics: MetricsInfo | None = None


class Completion(OpenAICompletion, GemServeFields):
    """The answer of ``completions.create()``, and each chunk of its stream."""


class ChatCompletion(OpenAIChatCompletion, GemServeFields):
    """The answer of ``chat.completions.create()``."""


class ChatCompletionChunk(OpenAIChatCompletionChunk, GemServeFields):
    """One chunk of a chat stream."""


ChunkT = TypeVar("ChunkT", Completion, ChatCompletionChunk)


class StreamTail:
    """What a stream remembers as it is read: the text so far, the last finish reason, and the final
    chunk's ``usage`` / ``compression`` / ``metrics``."""

    response: httpx2.Response
    text = ""
    finish_reason: str | None = None
    usage: CompletionUsage | None = None
    compression: CompressionInfo | None = None
    metrics: MetricsInfo | None = None

    @property
    def request_id(self) -> str | None:
        return self.response.headers.get(REQUEST_ID_HEADER)

    def _remember(self, chunk: ChunkT) -> ChunkT:
        self.usage = chunk.usage or self.usage
        self.compression = chunk.compression or self.compression
        self.metrics = chunk.metrics or self.metrics
        for choice in chunk.choices:
            self.text += (choice.text if isinstance(chunk, Completion) else choice.delta.content) or ""
            self.finish_reason = choice.finish_reason or self.finish_reason
        return chunk


class Stream(openai.Stream[ChunkT], StreamTail):
    """openai's ``Stream`` of typed chunks; ``text``, ``usage``, ``compression``... fill in as it is read."""

    def __stream__(self) -> Iterator[ChunkT]:
        return map(self._remember, super().__stream__())


class AsyncStream(openai.AsyncStream[ChunkT], StreamTail):
    """The async twin of ``Stream``: ``async for chunk in stream``, ``async with stream``."""

    async def __stream__(self) -> AsyncIterator[ChunkT]:
        async for chunk in super().__stream__():
            yield self._remember(chunk)


# ---- create(): GemServe's keywords and types on openai's resources ----------------------------
def compression_body(compression: CompressionLike) -> dict[str, Any] | None:
    """Validate ``compression`` (model or dict) against the server's schema; the dict to send."""
    if compression is None:
        return None
    if not isinstance(compression, CompressionParams):
        compression = CompressionParams.model_validate(compression)
    return compression.model_dump(exclude_unset=True, exclude_none=True)  # only what the caller set


def gemserve_params(params: dict[str, Any], compression: CompressionLike, ignore_eos: bool | None) -> dict[str, Any]:
    """openai's ``create()`` keywords for a GemServe call: the extensions go in ``extra_body``."""
    extensions = {"compression": compression_body(compression), "ignore_eos": ignore_eos}
    extra_body = {k: v for k, v in extensions.items() if v is not None} | dict(params.get("extra_body") or {})
    params = {**params, "extra_body": extra_body or None}
    if params.get("model") is None:
        params["model"] = openai.omit  # the server's model answers
    if params.get("stream"):
        # GemServe sends usage, compression and metrics on a final chunk only when usage is asked for.
        params.setdefault("stream_options", {"include_usage": True})
    return params


class GemServeCreate:
    """``create()`` with GemServe's keywords, answered in GemServe's types; the rest is openai's resource."""

    response_type: ClassVar[type]
    stream_type: ClassVar[type]

    def __init__(self, client: Any) -> None:
        super().__init__(client)  # type: ignore[call-arg]
        post = client.post

        def typed_post(path: str, *, cast_to: type, stream_cls: type | None = None, **kwargs: Any) -> Any:
            return post(path, cast_to=self.response_type, stream_cls=self.stream_type, **kwargs)

        self._post = typed_post  # openai's create() names its own types; the request is unchanged

    def create(self, *, compression: CompressionLike = None, ignore_eos: bool | None = None, **params: Any) -> Any:
        """openai's ``create()`` (same keywords; ``model`` optional) plus ``compression`` (a
        ``CompressionParams`` or a dict, validated before sending) and ``ignore_eos``."""
        return super().create(**gemserve_params(params, compression, ignore_eos))  # type: ignore[misc]


class Completions(GemServeCreate, resources.Completions):
    response_type, stream_type = Completion, Stream[Completion]


class AsyncCompletions(GemServeCreate, resources.AsyncCompletions):
    response_type, stream_type = Completion, AsyncStream[Completion]


class ChatCompletions(GemServeCreate, resources.chat.Completions):
    response_type, stream_type = ChatCompletion, Stream[ChatCompletionChunk]


class AsyncChatCompletions(GemServeCreate, resources.chat.AsyncCompletions):
    response_type, stream_type = ChatCompletion, AsyncStream[ChatCompletionChunk]


class Chat(resources.Chat):
    completions = cached_property(lambda chat: ChatCompletions(chat._client))


class AsyncChat(resources.AsyncChat):
    completions = cached_property(lambda chat: AsyncChatCompletions(chat._client))


class ModelsCall:
    def __call__(self) -> ModelList:
        """``GET /v1/models`` as GemServe's ``ModelList`` (``max_model_len`` typed); ``.list()`` is openai's."""
        return self._client._route(Route("/v1/models", partial(parse_model, ModelList)))  # type: ignore[attr-defined]


class Models(ModelsCall, resources.Models):
    pass


class AsyncModels(ModelsCall, resources.AsyncModels):
    pass


# ---- GemServe's routes outside /v1 -------------------------------------------------------------
def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def parse_model(model_type: type[ModelT], response: httpx2.Response) -> ModelT:
    try:
        return model_type.model_validate_json(response.content)
    except ValidationError as exc:
        message = f"unexpected {model_type.__name__} body: {exc}"
        raise openai.APIResponseValidationError(response, response.text, message=message) from exc


def json_or_status(response: httpx2.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {"status": response.text.strip()}
    return data if isinstance(data, dict) else {"status": data}


class MetricsSnapshot:
    """``GET /metrics`` parsed with prometheus_client's own text parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Metric] = {family.name: family for family in text_string_to_metric_families(text)}

    def value(self, sample_name: str, **labels: str) -> float | None:
        """The value of the sample named ``sample_name`` whose labels include ``labels``."""
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def __contains__(self, family_name: object) -> bool:
        return family_name in self.families


@dataclass(frozen=True)
class Route:
    """One call to a route by its path from the server root, through openai's ``get``/``post`` (so
    retries, timeouts, auth and errors are openai's)."""

    path: str
    parse: Callable[[httpx2.Response], Any]
    body: Mapping[str, Any] | None = None  # POST when given, else GET
    max_retries: int | None = None
    answers: Mapping[int, Any] = field(default_factory=dict)  # error statuses that are an answer, not an error

    def send(self, client: GemServeClient) -> Any:
        options: dict[str, Any] = {"idempotency_key": new_request_id()}  # the X-Request-Id of every attempt
        if self.max_retries is not None:
            options["max_retries"] = self.max_retries
        url = client.root_url + self.path
        if self.body is None:
            return client.get(url, cast_to=httpx2.Response, options=options)  # type: ignore[attr-defined]
        return client.post(url, cast_to=httpx2.Response, body=self.body, options=options)  # type: ignore[attr-defined]

    def answer(self, error: openai.APIStatusError) -> Any:
        if error.status_code in self.answers:
            return self.answers[error.status_code]
        raise error


class GemServeClient:
    """What both clients add to openai's: GemServe's defaults, one request id per call, the extra routes."""

    def __init__(self, base_url: str | httpx2.URL | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        """``base_url``: the server root or its ``/v1`` (default ``$GEMSERVE_BASE_URL``, else loopback);
        ``api_key`` (default ``$GEMSERVE_API_KEY``, else none). Other keywords are openai's
        (``timeout``, ``max_retries``, ``http_client``, ``default_headers``...)."""
        self.root_url = resolve_base_url(str(base_url) if base_url else None)
        kwargs["_enforce_credentials"] = False  # a GemServe without --api-key takes no key
        super().__init__(base_url=self.root_url + "/v1", api_key=resolve_api_key(api_key), **kwargs)  # type: ignore[call-arg]
        self._idempotency_header = REQUEST_ID_HEADER  # openai keeps one key for all attempts of a call

    def _idempotency_key(self) -> str:
        return new_request_id()

    def _validate_headers(self, headers: Any, custom_headers: Any) -> None:
        """No key, no Authorization header (openai would refuse to send): what a keyless server takes."""

    @property
    def _admin_api_key_auth(self) -> dict[str, str]:
        return {}  # an OPENAI_ADMIN_KEY in the environment is never sent to GemServe

    def _route(self, route: Route) -> Any:
        raise NotImplementedError

    def tokenize(
        self, prompt: str | None = None, *, messages: Iterable[MessageLike] | None = None, model: str | None = None
    ) -> TokenizeResponse:
        """``POST /tokenize``: the ids of ``prompt`` (no chat template) or of ``messages`` (with it)."""
        body = {"model": model, "prompt": prompt, "messages": None if messages is None else list(messages)}
        body = {key: value for key, value in body.items() if value is not None}
        return self._route(Route("/tokenize", partial(parse_model, TokenizeResponse), body=body))

    def health(self) -> dict[str, Any]:
        """``GET /health``: the JSON body, e.g. ``{"status": "ok"}``."""
        return self._route(Route("/health", json_or_status))

    def ready(self) -> bool:
        """``GET /ready``: True once the model is loaded; False while the server answers 503 (not retried)."""
        return self._route(Route("/ready", lambda response: True, max_retries=0, answers={503: False}))

    def metrics(self) -> MetricsSnapshot:
        """``GET /metrics``, parsed."""
        return self._route(Route("/metrics", lambda response: MetricsSnapshot(response.text)))


class GemServe(GemServeClient, openai.OpenAI):
    """The synchronous client: ``openai.OpenAI`` pointed at GemServe, with its extensions."""

    completions = cached_property(Completions)
    chat = cached_property(Chat)
    models = cached_property(Models)

    def _route(self, route: Route) -> Any:
        try:
            response = route.send(self)
        except openai.APIStatusError as error:
            return route.answer(error)
        return route.parse(response)


class AsyncGemServe(GemServeClient, openai.AsyncOpenAI):
    """The asynchronous client (``openai.AsyncOpenAI``): the same calls, awaited."""

    completions = cached_property(AsyncCompletions)
    chat = cached_property(AsyncChat)
    models = cached_property(AsyncModels)

    async def _route(self, route: Route) -> Any:
        try:
            response = await route.send(self)
        except openai.APIStatusError as error:
            return route.answer(error)
        return route.parse(response)
