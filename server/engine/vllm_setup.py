"""The vllm backend's own settings (``GEMSERVE_VLLM_*``) and its construction from the server's.

The engine itself (:class:`server.engine.vllm.VLLMEngine`) starts vLLM in :meth:`start`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from transformers import AutoTokenizer

from compressors.attention import DEFAULT_ATTENTION
from server.engine.filter_model import load_filter_model
from server.engine.filter_passes import DEFAULT_CHUNK_TOKENS
from server.engine.vllm import VLLMEngine

if TYPE_CHECKING:
    from server.settings import Settings


class VLLMSettings(BaseSettings):
    """Knobs of the vLLM engine itself, from ``GEMSERVE_VLLM_*`` env vars (e.g.
    ``GEMSERVE_VLLM_ENFORCE_EAGER=1``). The served model, context cap and default method come
    from the server's own settings."""

    model_config = SettingsConfigDict(env_prefix="GEMSERVE_VLLM_", extra="ignore")

    dtype: str = Field(
        "auto",
        description="vLLM's dtype ('auto': vLLM's own choice, bfloat16 for a float32 checkpoint on x86). The "
        "filter model is cast to whatever vLLM resolves, so both halves of a request run the same dtype",
    )
    enforce_eager: bool = Field(False, description="Skip torch.compile: faster start, slower steps")
    enable_prefix_caching: bool = Field(False, description="Off by default so every TTFT measures a real prefill")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache vLLM preallocates; default: 1 GiB, more if one full-context request needs it"
    )
    max_num_seqs: int = Field(16, ge=1, description="Sequences vLLM batches at once")
    filter_layer: int | None = Field(None, ge=0, description="Deepest GemFilter layer served (default: calibrated)")
    filter_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the filter pass in the API process. None (auto): every core this process "
        "may use while vLLM runs no request (its CPU worker then sleeps), 1 while it runs one, so the filter "
        "pass does not fight vLLM's worker for its core",
    )
    filter_chunk_tokens: int = Field(
        DEFAULT_CHUNK_TOKENS,
        ge=1,
        description="Tokens per chunk of a filter pass while other requests' passes wait (they take turns, a "
        "chunk each, so a short prompt's pass is not stuck behind a long one's); a pass alone runs whole",
    )
    recorded_prompts: int = Field(
        64, ge=0, description="Recent vLLM prompt ids and aborted request ids kept for inspection (tests)"
    )


def build_vllm_engine(settings: Settings) -> VLLMEngine:
    """Resolve the model dir (converting GGUF once), load tokenizer + filter model; vLLM starts
    in :meth:`VLLMEngine.start`. vLLM does not read GGUF on CPU, so it gets the converted dir."""
    from transformers import AutoConfig

    from server.models import resolve_model_dir

    if settings.default_attention != DEFAULT_ATTENTION:
        raise ValueError(
            f"--default-attention {settings.default_attention}: the vllm backend prefills with vLLM's own attention"
        )
    name, source = resolve_model_dir(settings.model, settings.cache_dir)
    model_dir = Path(source)
    options = VLLMSettings()
    context = int(getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "max_position_embeddings", 0))
    if settings.max_model_len is not None:
        if context and settings.max_model_len > context:
            raise ValueError(f"--max-model-len {settings.max_model_len} exceeds the model's context of {context}")
        context = settings.max_model_len
    return VLLMEngine(
        name=name,
        model_dir=model_dir,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        filter_model=load_filter_model(
            model_dir, options.filter_layer, profile=settings.profile, name=name, cache_dir=settings.cache_dir
        ),
        max_model_len=context,
        default_method=settings.default_method,
        max_queue=settings.max_queue,
        retry_after_s=settings.retry_after_s,
        options=options,
    )
