"""``gemserve serve``: the OpenAI-compatible HTTP server (flags override GEMSERVE_* env vars)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from server.engine.scheduler import DEFAULT_MAX_RUNNING, DEFAULT_STEP_TOKENS

# flag -> Settings field; a flag left unset keeps the env var or the default.
FLAGS: dict[str, dict[str, Any]] = {
    "--model": {"help": "alias (smollm2-135m-instruct, gemma3-270m), .gguf file, HF model dir or hub id"},
    "--backend": {"help": "hf (transformers in-process) or vllm (needs the vllm extra / .venv-vllm)"},
    "--device": {"help": "auto | cpu | cuda"},
    "--dtype": {"help": "auto | bfloat16 | float16 | float32, both backends (docs/api.md, Settings)"},
    "--filter-dtype": {"help": "GemFilter's filter pass: auto | bfloat16 | float16 | float32 (docs/api.md)"},
    "--cache-dir": {"type": Path, "help": "where converted models live"},
    "--max-model-len": {"type": int, "help": "cap the context length (default: the model's)"},
    "--profile": {"type": Path, "help": "GemFilter profile from `gemserve calibrate` (default: cache, then shipped)"},
    "--host": {"help": "address to bind (default 127.0.0.1)"},
    "--port": {"type": int, "help": "port (default 8000)"},
    "--default-method": {"help": "compression method when a request names none (default: none)"},
    "--default-attention": {"help": "prefill attention backend when a request names none (default: dense)"},
    "--max-concurrency": {"type": int, "help": f"hf: requests in the batch at once (default {DEFAULT_MAX_RUNNING})"},
    "--max-batch-tokens": {
        "type": int,
        "help": "hf: KV-cache tokens the batch may hold, each request its compressed prompt + what it generated; "
        "the newest is preempted when they outgrow it (default: 4 x the context length)",
    },
    "--max-num-batched-tokens": {
        "type": int,
        "help": "hf: tokens per step while requests decode: decode tokens + prefill / filter-pass chunks "
        f"(default {DEFAULT_STEP_TOKENS})",
    },
    "--shadow-fraction": {
        "type": float,
        "help": "hf: share (0..1) of greedy compressed requests rerun with full attention while the batch is idle, "
        "counting whether the answers agree (gemserve_shadow_checks_total; default 0: off)",
    },
    "--warmup": {
        "action": argparse.BooleanOptionalAction,
        "help": "hf: run none and gemfilter once on a short prompt before /ready, so the first request does not "
        "pay the one-time kernel set-up (default: on)",
    },
    "--step-trace": {
        "type": Path,
        "metavar": "FILE",
        "help": "hf: append a JSON line per engine step (wall time, decode tokens, prefill / filter-pass chunks)",
    },
    "--max-queue": {"type": int, "help": "requests waiting for a slot before 429 (default 64)"},
    "--api-key": {
        "help": "require 'Authorization: Bearer KEY' on every route but /health and /ready; visible to every "
        "user in `ps`: prefer GEMSERVE_API_KEY or --api-key-file"
    },
    "--api-key-file": {"type": Path, "help": "read the API key from the first line of this file"},
    "--max-request-bytes": {"type": int, "help": "largest request body before 413 (default: 64 B per context token)"},
    "--served-model-name": {"help": "model name reported by /v1/models"},
    "--malloc-mmap-threshold": {
        "type": int,
        "help": "bytes; in a forward of 4096+ prompt tokens glibc returns freed blocks from this size to the OS at "
        "once, so RSS follows live memory (default 131072; other steps 32 MiB; 0: glibc's adaptive threshold)",
    },
    "--default-max-tokens": {"type": int, "help": "max_tokens for chat requests that give none (default 256)"},
    "--vllm-arg": {
        "dest": "vllm_args",
        "action": "append",
        "metavar": "KEY=VALUE",
        "help": "vllm: one of vLLM's engine arguments (repeatable), e.g. tensor-parallel-size=2, "
        "distributed-executor-backend=ray, max-num-seqs=64, gpu-memory-utilization=0.85, enforce-eager; checked "
        "by vLLM before the API starts; replaces GEMSERVE_VLLM_ARGS",
    },
}


def field_of(flag: str) -> str:
    return FLAGS[flag].get("dest", flag[2:].replace("-", "_"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, options in FLAGS.items():
        parser.add_argument(flag, default=None, **options)


def settings_from_args(args: argparse.Namespace) -> Any:
    from server.settings import Settings

    overrides = {field_of(flag): getattr(args, field_of(flag)) for flag in FLAGS}
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.app import BACKENDS, create_app

    settings = settings_from_args(args)
    if settings.backend not in BACKENDS:
        raise ValueError(f"unknown backend '{settings.backend}'; available: {', '.join(BACKENDS)}")
    for name in ("gemserve.access", "server"):
        logging.getLogger(name).setLevel(settings.log_level.upper())
    if settings.vllm_args and settings.backend != "vllm":
        raise ValueError(
            f"--vllm-arg / GEMSERVE_VLLM_ARGS are vLLM's engine arguments: use --backend vllm, not {settings.backend}"
        )
    if settings.backend == "vllm":
        from server.engine.vllm_setup import check_vllm_args

        check_vllm_args(settings)  # a bad engine argument ends here, with vLLM's message
    from server.allocator import configure_heap

    heap = configure_heap(settings.malloc_mmap_threshold)  # before the model's tensors are allocated
    logging.getLogger("server").info("heap: %s", heap)
    app = create_app(settings)
    print(f"gemserve: serving {settings.model} ({settings.backend}) on http://{settings.host}:{settings.port}")
    # access_log off: the app writes its own one-line-per-request log with timings.
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info")
    return 0
