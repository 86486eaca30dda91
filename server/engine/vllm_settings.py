"""GemServe's knobs around vLLM (``GEMSERVE_VLLM_*``): a leaf that both the vllm engine and its
set-up read, so neither imports the other for it."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class VLLMSettings(BaseSettings):
    """GemServe's knobs around vLLM, from ``GEMSERVE_VLLM_*`` env vars (e.g.
    ``GEMSERVE_VLLM_ENFORCE_EAGER=1``). The engine knobs here (enforce_eager,
    enable_prefix_caching, kv_cache_gib, max_num_seqs) are GemServe's defaults: any of vLLM's own
    engine arguments given through ``--vllm-arg`` / ``GEMSERVE_VLLM_ARGS`` wins over them
    (server/engine/vllm_args.py). The served model, dtype, context cap and default method come from
    the server's own settings (``--dtype`` resolves for vLLM's device as for the hf backend: vLLM's
    own ``auto`` takes bfloat16 on any x86 CPU, which is emulated, and ~45x slower per matmul, on
    one without AMX or AVX512-BF16)."""

    model_config = SettingsConfigDict(env_prefix="GEMSERVE_VLLM_", extra="ignore")

    enforce_eager: bool = Field(False, description="Skip torch.compile: faster start, slower steps")
    enable_prefix_caching: bool = Field(False, description="Off by default so every TTFT measures a real prefill")
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache vLLM preallocates; default on CPU: 1 GiB, or two full-context requests if more "
        "(on a GPU: vLLM's gpu_memory_utilization)",
    )
    max_num_seqs: int = Field(16, ge=1, description="Sequences vLLM batches at once")
    filter_layer: int | None = Field(None, ge=0, description="Deepest GemFilter layer served (default: calibrated)")
    filter_device: str = Field(
        "auto",
        description="Where the filter pass runs: auto (the first visible CUDA GPU if torch sees one, the GPU of "
        "vLLM's tensor-parallel rank 0; else the CPU), cpu, or a torch device such as cuda:1",
    )
    filter_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the filter pass in the API process. None (auto): every core this process "
        "may use while vLLM runs no request (its CPU worker then sleeps), 1 while it runs one, so the filter "
        "pass does not fight vLLM's worker for its core",
    )
