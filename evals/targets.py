"""Where the eval's prompts go: the engine in this process, or any OpenAI-compatible server.

Both send the same prompt: chat messages through the model's chat template, or a completion
text ending in the task's answer prefix (for base models). Greedy, so the two agree token for
token (tests/test_eval_runner.py). In-process, methods that differ only in budget share their
expensive passes (:mod:`evals.sweep`) and the answer's token positions are known, so the
selection's answer-token recall is measured; over HTTP only what the response says is known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from contract.methods import UNBUDGETED, MethodSpec
from evals.tasks import Sample

if TYPE_CHECKING:
    from server.engine.hf import HFEngine

STYLES = ("chat", "completion")
# A completion prompt ends in the start of the answer sentence, so the answer is that line: a base
# model then goes on with a new "Question: ..." that only costs decode time (lm-eval-harness
# stops such tasks at a newline too). Chat models end their turn with EOS.
COMPLETION_STOP = ["\n"]


def stop_strings(style: str) -> list[str]:
    return list(COMPLETION_STOP) if style == "completion" else []


@dataclass
class Outcome:
    """What one method answered on one sample, and what it kept."""

    text: str
    prompt_tokens: int
    kept_tokens: int | None = None
    layer: int | None = None
    ttft_ms: float | None = None
    span_texts: list[str] | None = None  # the kept text spans (compressed methods)
    answer_token_recall: float | None = None  # fraction of the answers' tokens kept
    compression: dict[str, Any] | None = None
    shared_prefill: bool = False


class Target(Protocol):
    model_name: str
    dtype: str | None  # what the model runs in (None: a server that does not say)

    def count_tokens(self, sample: Sample, style: str) -> int: ...

    def run(self, sample: Sample, style: str, methods: list[MethodSpec]) -> list[Outcome]: ...


def tokens_overlapping(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token positions whose character span overlaps ``[start, end)``."""
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


class InProcessTarget:
    """The HF engine in this process. ``share``: one filter pass / full prefill per prompt for
    all methods (:mod:`evals.sweep`); off, each method runs through ``engine.generate``."""

    def __init__(self, engine: HFEngine, share: bool = True) -> None:
        self.engine = engine
        self.share = share
        self.model_name = engine.model_name
        self.dtype: str | None = engine.dtype

    def encode(self, sample: Sample, style: str) -> list[int]:
        if style == "chat":
            return self.engine.encode_chat(sample.chat_messages())
        return self.engine.encode_prompt(sample.completion_prompt())

    def count_tokens(self, sample: Sample, style: str) -> int:
        return len(self.encode(sample, style))

    def run(self, sample: Sample, style: str, methods: list[MethodSpec]) -> list[Outcome]:
        from evals.sweep import run_many
        from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

        prompt_ids = self.encode(sample, style)
        requests = [
            GenerationRequest(
                prompt_ids=prompt_ids,
                sampling=SamplingParams(max_tokens=sample.max_tokens, temperature=0.0, stop=stop_strings(style)),
                compression=CompressionSpec(
                    method=spec.method_name(),
                    knobs=spec.method_knobs(),
                    return_selection=spec.name not in UNBUDGETED,
                    attention=spec.attention,
                    attention_knobs=dict(spec.attention_knobs),
                ),
            )
            for spec in methods
        ]
        results = run_many(self.engine, requests) if self.share else [self.engine.generate(r) for r in requests]
        answer_tokens = self.answer_positions(sample, style, prompt_ids)
        outcomes = []
        for result in results:
            report = result.compression
            selection = report.selection
            kept = set(selection.kept_indices) if selection else None
            recall = None
            if kept is not None and answer_tokens:
                recall = sum(p in kept for p in answer_tokens) / len(answer_tokens)
            outcomes.append(
                Outcome(
                    text=result.text,
                    prompt_tokens=result.prompt_tokens,
                    kept_tokens=report.kept_tokens,
                    layer=report.layer,
                    ttft_ms=None if self.share else result.metrics.ttft_ms,
                    span_texts=[span.text for span in selection.spans] if selection else None,
                    answer_token_recall=recall,
                    compression=report.model_dump(exclude_none=True, exclude={"selection"}),
                    shared_prefill=self.share,
                )
            )
        return outcomes

    def answer_positions(self, sample: Sample, style: str, prompt_ids: list[int]) -> list[int] | None:
        """Token positions of the answers in the prompt, when each answer is in the context once
        and the prompt's text re-tokenises to the same ids (offsets come from that encoding)."""
        tokenizer = self.engine.tokenizer
        if any(sample.context.count(answer) != 1 for answer in sample.answers):
            return None
        if style == "chat" and tokenizer.chat_template is not None:
            text = tokenizer.apply_chat_template(sample.chat_messages(), add_generation_prompt=True, tokenize=False)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        else:
            text = (
                sample.completion_prompt()
                if style == "completion"
                else "\n\n".join(m["content"] for m in sample.chat_messages())
            )
            encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if list(encoded["input_ids"]) != prompt_ids or sample.context not in text:
            return None
        base = text.index(sample.context)
        positions: list[int] = []
        for answer in sample.answers:
            start = base + sample.context.index(answer)
            positions += tokens_overlapping(encoded["offset_mapping"], start, start + len(answer))
        return positions


class HTTPTarget:
    """Any OpenAI-compatible server (GemServe, vLLM): ``/tokenize`` counts the prompt the way the
    server will, ``/v1/chat/completions`` or ``/v1/completions`` answers it. A method other than
    ``none`` is sent as GemServe's ``compression`` object; ``none`` sends a plain request."""

    def __init__(
        self, base_url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = 3600.0
    ) -> None:
        root = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=root, headers=headers, timeout=timeout_s)
        card = self.model_card(model)
        self.model_name = model or str(card["id"])
        self.dtype: str | None = card.get("dtype")  # GemServe says; vLLM's card does not

    def model_card(self, model: str | None) -> dict[str, Any]:
        """``model``'s card from /v1/models (the first one when no model is named); a server without
        the route is fine when the model is named."""
        try:
            models = self.post_or_get("GET", "/v1/models")["data"]
        except RuntimeError:
            if model is None:
                raise
            return {"id": model}
        if not models:
            raise ValueError(f"{self.client.base_url} serves no model")
        return dict(next((card for card in models if card.get("id") == model), models[0]))

    def post_or_get(self, verb: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.client.request(verb, path, json=body)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise RuntimeError(f"{verb} {path} -> HTTP {response.status_code}: {message}")
        return response.json()

    def count_tokens(self, sample: Sample, style: str) -> int:
        body: dict[str, Any] = {"model": self.model_name}
        if style == "chat":
            body["messages"] = sample.chat_messages()
        else:
            body["prompt"] = sample.completion_prompt()
        return int(self.post_or_get("POST", "/tokenize", body)["count"])

    def run(self, sample: Sample, style: str, methods: list[MethodSpec]) -> list[Outcome]:
        return [self.run_one(sample, style, spec) for spec in methods]

    def run_one(self, sample: Sample, style: str, spec: MethodSpec) -> Outcome:
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": sample.max_tokens, "temperature": 0.0}
        if stop_strings(style):
            body["stop"] = stop_strings(style)
        compression = spec.compression()
        if compression is not None:
            body["compression"] = {**compression, "return_selection": spec.name not in UNBUDGETED}
        if style == "chat":
            path, body["messages"] = "/v1/chat/completions", sample.chat_messages()
        else:
            path, body["prompt"] = "/v1/completions", sample.completion_prompt()
        started = time.perf_counter()
        data = self.post_or_get("POST", path, body)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        choice = data["choices"][0]
        text = choice["message"]["content"] if style == "chat" else choice["text"]
        info = data.get("compression") or {}
        metrics = data.get("metrics") or {}
        selection = info.get("selection")
        return Outcome(
            text=text or "",
            prompt_tokens=int(data.get("usage", {}).get("prompt_tokens", 0)),
            kept_tokens=info.get("kept_tokens"),
            layer=info.get("layer"),
            ttft_ms=metrics.get("ttft_ms", elapsed_ms),
            span_texts=[span["text"] for span in selection["spans"]] if selection else None,
            compression={k: v for k, v in info.items() if k != "selection"} or None,
        )
