"""Arguments and set-up shared by the commands that load a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.methods import parse_value
from server.settings import add_dtype_arguments

if TYPE_CHECKING:
    from server.engine.hf import HFEngine


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="alias (smollm2-135m-instruct, gemma3-270m), a .gguf file, an HF model dir or a hub id",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    add_dtype_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, help="where converted models live (env GEMSERVE_CACHE_DIR)")
    parser.add_argument("--max-model-len", type=int, help="cap the context length (default: the model's)")
    parser.add_argument("--profile", type=Path, help="GemFilter profile from `gemserve calibrate` (default: looked up)")


def load_engine(args: argparse.Namespace, default_method: str = "none") -> HFEngine:
    from server.engine.hf import HFEngine
    from server.models import load_model

    loaded = load_model(
        args.model,
        device=args.device,
        cache_dir=args.cache_dir,
        max_model_len=args.max_model_len,
        profile=getattr(args, "profile", None),
        dtype=args.dtype,
        filter_dtype=args.filter_dtype,
    )
    return HFEngine(loaded, default_method=default_method)


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    """``["window=32", "pooling=max"]`` -> ``{"window": 32, "pooling": "max"}`` (JSON values)."""
    knobs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--knob takes NAME=VALUE, got '{pair}'")
        knobs[name] = parse_value(raw)
    return knobs


class ListKnobs(argparse.Action):
    """``--list-knobs``: every method's and attention backend's knobs, what each takes, its default
    and what it does, read from their declarations (compressors/knobs.py); then exit. Imported
    only when asked: the method library pulls in torch, which ``gemserve --help`` should not wait for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(knob_help())
        parser.exit()


KNOB_HELP_TITLES = {
    "method": "method knobs (--knob NAME=VALUE; --budget, --ratio and --layer set theirs):",
    "attention backend": "attention backends (--knob attention=NAME, --attention-knob NAME=VALUE):",
}


def knob_help() -> str:
    from cli.knob_docs import knob_tables

    lines: list[str] = []
    for kind, tables in knob_tables():
        lines += ["", KNOB_HELP_TITLES[kind]] if lines else [KNOB_HELP_TITLES[kind]]
        for name, rows in tables:
            lines.append(f"  {name}" + ("" if rows else ": no knobs"))
            lines += [f"    {knob} ({takes}; default {default}): {text}" for knob, takes, default, text in rows]
    return "\n".join(lines)
