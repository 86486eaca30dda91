"""``gemserve prepare-model``: resolve a model and convert it to safetensors in the cache, then exit.

Used at image build time (docker/Dockerfile) so a container starts on a converted model
instead of dequantising the GGUF file on its first start.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="alias (smollm2-135m-instruct, gemma3-270m), a .gguf file, an HF model dir or a hub id",
    )
    parser.add_argument("--cache-dir", type=Path, help="where converted models live (env GEMSERVE_CACHE_DIR)")


def run(args: argparse.Namespace) -> int:
    from server.models import resolve_model_dir

    name, source = resolve_model_dir(args.model, args.cache_dir)
    print(f"{name}: {source}")
    return 0
