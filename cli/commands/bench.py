"""``gemserve bench``: the prefill benchmark (bench/prefill.py), run from a source checkout."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import prefill

CHECKOUT = Path(prefill.__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prefill.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # The benchmark writes bench/results and docs/benchmarks.md beside itself: an installed copy
    # (site-packages) has no docs to update.
    if not (CHECKOUT / "docs" / "benchmarks.md").is_file():
        raise FileNotFoundError(
            f"'gemserve bench' needs a GemServe source checkout: {CHECKOUT / 'docs'} does not exist"
        )
    return int(prefill.run(args))
