"""``gemserve bench``: the prefill benchmark (bench/prefill.py), run from a source checkout."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]


def import_bench_module(name: str) -> ModuleType:
    """Benchmarks live in the repo's ``bench/`` (not part of the installed package): put the
    checkout on the path, or say clearly that one is needed."""
    if not (REPO_ROOT / "bench" / "common.py").is_file():
        raise FileNotFoundError(f"'{name}' needs a GemServe source checkout: {REPO_ROOT / 'bench'} does not exist")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(name)


def add_bench_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The CLI builds every command's parser at start: without a checkout (a plain ``pip
    install``) add nothing here, so other commands still work, and let ``run`` say why."""
    try:
        module = import_bench_module(name)
    except FileNotFoundError:
        return
    module.add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bench_arguments(parser, "bench.prefill")


def run(args: argparse.Namespace) -> int:
    return int(import_bench_module("bench.prefill").run(args))
