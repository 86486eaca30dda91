"""``gemserve``: serve | generate | eval | calibrate | bench | loadtest."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from cli.commands import bench, generate, prepare, serve
from clients import loadtest
from evals import calibrate, runner

# command -> (module, one-line help). Each module defines add_arguments() and run(); heavy imports
# (torch, transformers) wait inside run(), so `gemserve --help` and the client commands start fast.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "generate": (generate, "answer one prompt with a compression method and print its cost"),
    "prepare-model": (prepare, "convert a model into the cache ahead of serving (image builds)"),
    "serve": (serve, "serve the OpenAI-compatible HTTP API with per-request compression"),
    "loadtest": (loadtest, "load-test an OpenAI-compatible server (GemServe or vLLM), compare methods"),
    "bench": (bench, "prefill benchmark: none vs GemFilter at 1K-8K tokens (bench/prefill.py)"),
    "eval": (runner, "long-context eval suite: RULER-style tasks x lengths x depths x methods, scored"),
    "calibrate": (calibrate, "pick GemFilter's filter layer for a model from needle probes, write its profile"),
}


class CLIError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemserve", description="Long-context LLM serving with GemFilter")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, OSError) as exc:
        # One line, no traceback: bad input is the user's to fix, not ours to dump.
        print(f"gemserve {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; a settings validation error names the flag and env var."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.title == "Settings":
        parts = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            flag, env = "--" + field.replace("_", "-"), "GEMSERVE_" + field.upper()
            parts.append(f"{flag} / {env}: {error['msg']} (got {error.get('input')!r})")
        return "; ".join(parts)
    return " ".join(str(exc).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
