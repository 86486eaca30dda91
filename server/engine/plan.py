"""What every backend does the same way around generation: the context check before it and the
``compression`` report after it, so the hf and vllm backends cannot drift apart."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from compressors import CompressionError, Method, PromptSelector, Selection
from server.engine.types import CompressionReport, RequestError


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
        )


def check_context_length(
    prompt_tokens: int, method: Method, max_tokens: int, max_model_len: int, default_budget: int
) -> None:
    """Refuse a prompt beyond the context, or one that leaves no room for ``max_tokens``."""
    check_prompt_fits(prompt_tokens, max_model_len)
    # Positions used: a prompt selector restarts them at 0 for the kept tokens.
    used = method.resolve_budget(prompt_tokens, default_budget) if isinstance(method, PromptSelector) else prompt_tokens
    if used + max_tokens > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request needs "
            f"{used} prompt positions + {max_tokens} max_tokens",
            param="max_tokens",
        )


def compression_report(
    method: Method,
    selection: Selection,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    return_selection: bool,
) -> CompressionReport:
    """The response's ``compression`` field; the kept indices and text spans only when asked."""
    report = CompressionReport(
        method=method.name,
        prompt_tokens=selection.prompt_tokens,
        kept_tokens=selection.kept_tokens,
        ratio=selection.ratio,
        select_ms=selection.select_ms,
        layer=selection.layer,
        skipped=selection.skipped,
        filter_attention=selection.filter_attention,
    )
    if return_selection:
        report.selection = {
            "kept_indices": selection.kept_indices,
            "protected_tail": selection.protected_tail,
            "spans": [
                {"start": start, "end": end, "text": tokenizer.decode(prompt_ids[start:end], skip_special_tokens=False)}
                for start, end in selection.spans
            ],
            **selection.details,
        }
    return report
