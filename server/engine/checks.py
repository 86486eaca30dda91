"""The checks every backend runs on a request before generating (the 400s), and the
``compression`` report after it, so the hf and vllm backends cannot drift apart."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from compressors import CompressionError, Method, Selection
from compressors.knobs import short_repr
from contract.protocol import AttentionInfo, CompressionInfo
from server.engine.spans import selection_info
from server.engine.types import CompressionSpec, GenerationRequest, RequestError

# OpenAI's error code for a prompt (plus max_tokens) beyond the context: the one rule between
# fields that the request schema cannot state (JSON Schema counts neither tokens nor sums).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def check_prompt_and_sampling(request: GenerationRequest, vocab_size: int) -> None:
    """What any backend refuses before looking at the method: an empty prompt, an unknown token
    id (token-id prompts come from clients and would crash the forward), bad sampling values."""
    check_token_ids(request.prompt_ids, vocab_size)
    request.sampling.validate()


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """A token-id prompt is non-empty and inside the vocabulary."""
    if not ids:
        raise RequestError("prompt must not be empty", param="prompt")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise RequestError(
            f"prompt token id {short_repr(bad)} is outside the vocabulary [0, {vocab_size})", param="prompt"
        )


def check_method_fits(
    request: GenerationRequest, method: Method, model: PreTrainedModel, max_model_len: int, default_budget: int
) -> None:
    """The built method against this prompt: the context it takes and its knobs' budget."""
    prompt_tokens = len(request.prompt_ids)
    check_context_length(prompt_tokens, method, model, request.sampling.max_tokens, max_model_len, default_budget)
    check_method_for_prompt(method, prompt_tokens, default_budget)


def check_method_for_prompt(method: Method, prompt_tokens: int, default_budget: int) -> None:
    """The method's knobs against the budget this prompt resolves to, at admission."""
    try:
        method.validate_for_prompt(prompt_tokens, default_budget)
    except CompressionError as exc:
        raise RequestError(str(exc), param=exc.param) from exc


def check_prompt_fits(prompt_tokens: int, max_model_len: int, param: str = "prompt") -> None:
    if prompt_tokens > max_model_len:
        raise RequestError(
            f"prompt is {prompt_tokens} tokens, longer than the model's context of {max_model_len} tokens",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def check_context_length(
    prompt_tokens: int, method: Method, model: PreTrainedModel, max_tokens: int, max_model_len: int, default_budget: int
) -> None:
    """Refuse a prompt beyond the context, or one that leaves no room for ``max_tokens``."""
    check_prompt_fits(prompt_tokens, max_model_len)
    used = method.prefill_positions(model, prompt_tokens, default_budget)
    if used + max_tokens > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request needs "
            f"{used} prompt positions + {max_tokens} max_tokens",
            param="max_tokens",
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def compression_report(
    method: Method,
    selection: Selection,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    spec: CompressionSpec,
) -> CompressionInfo:
    """The response's ``compression`` field; the selection (server/engine/spans.py) only when asked."""
    return CompressionInfo(
        method=method.name,
        prompt_tokens=selection.prompt_tokens,
        kept_tokens=selection.kept_tokens,
        kept_tokens_union=selection.kept_tokens_union,
        ratio=selection.ratio,
        select_ms=selection.select_ms,
        layer=selection.layer,
        skipped=selection.skipped,
        filter_attention=None if selection.filter_attention is None else AttentionInfo(**selection.filter_attention),
        filter_dtype=selection.filter_dtype,
        confidence=selection.confidence,
        fallback=selection.fallback,
        selection=selection_info(selection, tokenizer, prompt_ids, spec.return_scores)
        if spec.return_selection or spec.return_scores
        else None,
    )
