"""``gemserve calibrate``: measure GemFilter's needle recall per filter layer
(bench/calibrate_layer.py) from a source checkout."""

from __future__ import annotations

import argparse

from server.commands.bench import add_bench_arguments, import_bench_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bench_arguments(parser, "bench.calibrate_layer")


def run(args: argparse.Namespace) -> int:
    return int(import_bench_module("bench.calibrate_layer").run(args))
