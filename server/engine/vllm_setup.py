"""The vllm backend's own settings (``GEMSERVE_VLLM_*``) and its construction from the server's.

The engine itself (:class:`server.engine.vllm.VLLMEngine`) starts vLLM in :meth:`start`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer

from compressors.attention import DEFAULT_ATTENTION
from server.engine.filter_model import filter_device, load_filter_model
from server.engine.vllm import VLLMEngine
from server.engine.vllm_args import KV_CACHE_SIZERS, VLLMArgumentError, check_config, engine_args
from server.engine.vllm_measure import config_kv_bytes_per_token
from server.engine.vllm_settings import VLLMSettings
from server.precision import Capability, ResolvedDtype, pick_dtype

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.settings import Settings


def build_vllm_engine(settings: Settings) -> VLLMEngine:
    """Resolve the model dir (converting GGUF once), load tokenizer + filter model; vLLM starts
    in :meth:`VLLMEngine.start`. vLLM does not read GGUF on CPU, so it gets the converted dir."""
    name, model_dir = resolve_vllm_model(settings)
    options = VLLMSettings()
    args = vllm_engine_args(settings, model_dir, options)
    device = filter_device(options.filter_device)
    filter_dtype = pick_dtype(settings.filter_dtype, device, "GemFilter's filter pass", gpu_capability(device))
    return VLLMEngine(
        name=name,
        model_dir=model_dir,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        filter_model=load_filter_model(
            model_dir,
            options.filter_layer,
            dtype=filter_dtype.torch_dtype,
            profile=settings.profile,
            name=name,
            cache_dir=settings.cache_dir,
        ),
        max_model_len=int(args.max_model_len),
        default_method=settings.default_method,
        max_queue=settings.max_queue,
        retry_after_s=settings.retry_after_s,
        options=options,
        engine_args=args,
    )


def check_vllm_args(settings: Settings) -> None:
    """What ``gemserve serve --backend vllm`` checks before the API starts: the engine arguments
    (passthrough included) as vLLM parses them and as vLLM's config accepts them for this model."""
    _, model_dir = resolve_vllm_model(settings)
    check_config(vllm_engine_args(settings, model_dir, VLLMSettings()))


def resolve_vllm_model(settings: Settings) -> tuple[str, Path]:
    from server.models import resolve_model_dir

    if settings.default_attention != DEFAULT_ATTENTION:
        raise ValueError(
            f"--default-attention {settings.default_attention}: the vllm backend prefills with vLLM's own attention"
        )
    name, source = resolve_model_dir(settings.model, settings.cache_dir)
    return name, Path(source)


def vllm_engine_args(settings: Settings, model_dir: Path, options: VLLMSettings) -> AsyncEngineArgs:
    """vLLM's engine arguments: ``settings.vllm_args`` parsed by vLLM, GemServe's defaults for the rest
    (the GEMSERVE_VLLM_* knobs above, the context, and on CPU a KV cache sized for this model)."""
    defaults = {
        "dtype": vllm_dtype(settings.dtype).name,
        "enforce_eager": options.enforce_eager,
        "enable_prefix_caching": options.enable_prefix_caching,
        "max_num_seqs": options.max_num_seqs,
        "max_model_len": model_context(settings, model_dir),
        "disable_log_stats": True,
    }
    args, given = engine_args(model_dir, settings.vllm_args, defaults)
    if "max_model_len" in given and settings.max_model_len not in (None, args.max_model_len):
        raise VLLMArgumentError(
            f"--max-model-len {settings.max_model_len} and --vllm-arg max-model-len={args.max_model_len} disagree"
        )
    if not given & KV_CACHE_SIZERS and options.kv_cache_gib is not None:
        args.kv_cache_memory_bytes = int(options.kv_cache_gib * (1 << 30))
    elif not given & KV_CACHE_SIZERS and runs_on_cpu():
        args.kv_cache_memory_bytes = default_cpu_kv_cache_bytes(model_dir, args.dtype, int(args.max_model_len))
    return args


def vllm_dtype(requested: str) -> ResolvedDtype:
    """``--dtype`` for vLLM's device (the CPU, or its GPUs), by the same rule as the hf backend."""
    if "GEMSERVE_VLLM_DTYPE" in os.environ:
        raise ValueError("GEMSERVE_VLLM_DTYPE is gone: GEMSERVE_DTYPE (or --dtype) sets both backends' dtype")
    device = "cpu" if runs_on_cpu() else "cuda"
    return pick_dtype(requested, device, "vLLM", gpu_capability(device))


def gpu_capability(device: str) -> Capability | None:
    """What a GPU can compute, read through vLLM's platform (NVML) so that no CUDA context starts in
    this process before vLLM's workers do (they own the GPU's memory); None on the CPU, which is
    checked by running the dtype."""
    if torch.device(device).type != "cuda":
        return None
    from vllm.platforms import current_platform

    return Capability("cuda", cuda_bf16=bool(current_platform.has_device_capability(80)))


def model_context(settings: Settings, model_dir: Path) -> int:
    from transformers import AutoConfig

    context = int(getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "max_position_embeddings", 0))
    if settings.max_model_len is not None:
        if context and settings.max_model_len > context:
            raise ValueError(f"--max-model-len {settings.max_model_len} exceeds the model's context of {context}")
        context = settings.max_model_len
    return context


def runs_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def default_cpu_kv_cache_bytes(model_dir: Path, dtype: str, max_model_len: int) -> int:
    """vLLM on CPU would otherwise reserve 92% of RAM (and refuse to start when less is free): 1 GiB or
    room for two full-context requests, whichever is larger. On a GPU vLLM's own gpu_memory_utilization
    sizes the cache."""
    per_token = config_kv_bytes_per_token(model_dir, dtype)
    return max(1 << 30, 2 * per_token * max_model_len)
