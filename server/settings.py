"""Server settings: command-line flags override ``GEMSERVE_*`` environment variables.

Every field below can be set as an env var with the ``GEMSERVE_`` prefix, e.g.
``GEMSERVE_API_KEY=secret``, ``GEMSERVE_MAX_QUEUE=8``. docs/api.md lists them.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.allocator import DEFAULT_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD
from server.engine.scheduler import DEFAULT_MAX_RUNNING, DEFAULT_STEP_TOKENS

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]  # server/precision.py resolves them


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GEMSERVE_", extra="ignore")

    model: str = Field("smollm2-135m-instruct", description="Model alias, .gguf file, HF model dir or hub id")
    backend: str = Field("hf", description="Generation backend: hf (transformers in-process) or vllm")
    device: str = Field("auto", description="auto | cpu | cuda")
    dtype: DtypeName = Field(
        "auto",
        description="Weights and activations: auto (bfloat16 on CUDA and on a CPU with native bfloat16 matmuls, "
        "AMX or AVX512-BF16; float32 otherwise), bfloat16, float16 or float32; both backends",
    )
    filter_dtype: DtypeName = Field(
        "auto",
        description="GemFilter's filter pass (it only ranks tokens): auto (what --dtype auto picks on this hardware) "
        "or a dtype; a dtype other than the model's holds a copy of layers 0..r in it",
    )
    cache_dir: Path | None = Field(None, description="Where converted models are cached")
    max_model_len: int | None = Field(None, ge=1, description="Cap the context length (default: the model's)")
    profile: Path | None = Field(None, description="GemFilter profile from `gemserve calibrate` (default: looked up)")
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port)")
    default_method: str = Field("none", description="Compression method when a request names none")
    default_attention: str = Field(
        "dense", description="Prefill attention backend when a request names none (hf backend; vllm: dense only)"
    )
    max_concurrency: int = Field(
        DEFAULT_MAX_RUNNING,
        ge=1,
        description="hf: requests in the batch at once (their decode forwards shared); vllm: unused",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="hf: KV-cache tokens the batch may hold (each request: its prompt after compression + what it "
        "has generated; the newest is preempted and recomputed later when they outgrow it); a request whose "
        "largest cache exceeds it -> 400 (default: 4 x the context length)",
    )
    max_num_batched_tokens: int = Field(
        DEFAULT_STEP_TOKENS,
        ge=1,
        description="hf: tokens per step while requests decode (decode tokens + prefill and filter-pass chunks, "
        "a chunk's tokens weighted by their attention and layer count); with none decoding a prefill runs whole",
    )
    shadow_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="hf: share of the greedy requests whose compression dropped prompt tokens that are rerun with "
        "full attention while the batch is idle, counting whether the answers agree "
        "(gemserve_shadow_checks_total); 0: off; never delays a response",
    )
    warmup: bool = Field(
        True,
        description="hf: before /ready, run none and gemfilter once on a short prompt so the first request does "
        "not pay the one-time kernel set-up (~1 s at start-up; docs/benchmarks.md)",
    )
    step_trace: Path | None = Field(
        None,
        description="hf: append one JSON line per engine step to this file (its wall time, decode tokens, prefill "
        "and filter-pass chunks); for benchmarks and for seeing how the scheduler cut a load into steps",
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting for a slot; beyond this -> 429")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with a 429")
    api_key: str | None = Field(
        None,
        description="When set, every route but /health and /ready needs this bearer key "
        "(prefer GEMSERVE_API_KEY or api_key_file: a --api-key flag is visible to every user in ps)",
    )
    api_key_file: Path | None = Field(None, description="Read the API key from this file (its first line)")
    max_request_bytes: int | None = Field(
        None, ge=1, description="Largest request body; beyond it -> 413 (default: 64 bytes per context token, >= 1 MiB)"
    )
    malloc_mmap_threshold: int = Field(
        DEFAULT_MMAP_THRESHOLD,
        ge=0,
        le=MAX_MMAP_THRESHOLD,
        description="gemserve serve: glibc's mmap threshold in forwards of 4096+ prompt tokens, so their freed "
        "tensors return to the OS and RSS follows live memory (other steps: 32 MiB, the heap's free pages "
        "returned when the batch goes idle; 0: glibc's adaptive default; MALLOC_MMAP_THRESHOLD_ in the environment "
        "wins); server/allocator.py",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for chat requests that give none")
    served_model_name: str | None = Field(None, description="Name reported by /v1/models (default: the model's)")
    log_level: str = Field("info", description="Logging level of the server")
    # NoDecode: the env var is a shell-like string ("tensor-parallel-size=2 enforce-eager"), not JSON.
    vllm_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="vllm: vLLM's own engine arguments as KEY=VALUE (tensor-parallel-size=2, "
        "distributed-executor-backend=ray, gpu-memory-utilization=0.85 ...), checked by vLLM's AsyncEngineArgs "
        "before the API starts; GEMSERVE_VLLM_ARGS takes them space-separated",
    )

    @field_validator("shadow_fraction")
    @classmethod
    def shadow_needs_hf(cls, value: float, info: ValidationInfo) -> float:
        backend = info.data.get("backend")
        if value and backend != "hf":
            raise ValueError(f"the shadow check runs on the hf backend only, not {backend}; leave it 0")
        return value

    @field_validator("step_trace")
    @classmethod
    def step_trace_needs_hf(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        backend = info.data.get("backend")
        if value is not None and backend != "hf":
            raise ValueError(f"the step trace records the hf backend's steps, not {backend}'s; leave it unset")
        if value is not None and not value.parent.is_dir():
            raise ValueError(f"no directory {value.parent} to write the step trace {value.name} in")
        return value

    @field_validator("vllm_args", mode="before")
    @classmethod
    def split_vllm_args(cls, value: object) -> object:
        return shlex.split(value) if isinstance(value, str) else value

    def resolved_api_key(self) -> str | None:
        """The key from ``api_key`` or the first line of ``api_key_file`` (not both)."""
        if self.api_key_file is None:
            return self.api_key or None
        if self.api_key:
            raise ValueError("give either an API key or an API key file, not both")
        lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
        key = lines[0] if lines else ""
        if not key:
            raise ValueError(f"API key file {self.api_key_file} is empty")
        return key


def add_dtype_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--filter-dtype`` as the server's settings define them (server/precision.py
    resolves them), checked when the model loads."""
    for field in ("dtype", "filter_dtype"):
        info = Settings.model_fields[field]
        parser.add_argument("--" + field.replace("_", "-"), default=info.default, help=info.description)
