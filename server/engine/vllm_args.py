"""vLLM's own engine arguments, passed through: ``--vllm-arg KEY=VALUE`` or ``GEMSERVE_VLLM_ARGS``.

GemServe declares none of vLLM's engine arguments itself: each ``KEY=VALUE`` becomes ``--KEY VALUE``
on vLLM's own argument parser (``AsyncEngineArgs.add_cli_args``), so the names, types, choices and
error messages are vLLM's, tensor/pipeline parallelism, Ray, quantization and the rest included.
Then vLLM builds its config (``create_engine_config``), which checks the values against the model
and the machine (heads divisible by the tensor-parallel size, memory utilization <= 1, a known
quantization...). ``gemserve serve`` runs both before the API starts (:func:`check_vllm_args`), so a
bad argument ends the command with vLLM's message; the engine later starts from the same
arguments (:func:`engine_args`).

GemServe's defaults for the arguments it has always set (dtype, eager mode, prefix caching, the
sequence cap, the KV-cache size on CPU) apply where the passthrough does not name them.
"""

from __future__ import annotations

import argparse
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

# Set by GemServe from its own flags: a passthrough would serve another model than /v1/models names.
OWNED = {
    "model": "--model",
    "tokenizer": "--model",
    "served_model_name": "--served-model-name",
    "dtype": "--dtype",  # one setting for both backends, resolved for the hardware (server/precision.py)
}
# Either of these sizes the KV cache; GemServe's CPU default (kv_cache_memory_bytes) yields to them.
KV_CACHE_SIZERS = frozenset({"kv_cache_memory_bytes", "gpu_memory_utilization"})
TRUE, FALSE = frozenset({"", "1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


class VLLMArgumentError(ValueError):
    """A passthrough argument vLLM (or GemServe, for the ones it owns) refuses; the message is vLLM's."""


@cache
def vllm_parser() -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            # argparse would print usage and exit; the CLI prints one line instead.
            raise VLLMArgumentError(f"vLLM: {message}")

    return AsyncEngineArgs.add_cli_args(Parser(prog="vllm", add_help=False))


def to_argv(pairs: list[str]) -> tuple[list[str], set[str]]:
    """``KEY=VALUE`` pairs -> vLLM command-line arguments, and the engine-argument fields they set.
    ``KEY`` alone or ``KEY=true`` turns a switch on, ``KEY=false`` off (``--no-KEY``)."""
    parser = vllm_parser()
    argv: list[str] = []
    given: set[str] = set()
    for pair in pairs:
        key, has_value, value = pair.partition("=")
        key = key.strip().removeprefix("--").replace("_", "-")
        if not key:
            raise VLLMArgumentError(f"--vllm-arg takes KEY=VALUE (a vLLM engine argument), got {pair!r}")
        action = parser._option_string_actions.get(f"--{key}")  # argparse keeps no public map
        dest = action.dest if action is not None else key.replace("-", "_")
        if dest in OWNED:
            raise VLLMArgumentError(f"--vllm-arg {key}: GemServe sets vLLM's {key} itself; use {OWNED[dest]}")
        if action is not None and action.nargs == 0:  # a switch: store_true or --x/--no-x
            argv.append(switch(key, value, action))
        else:
            argv += [f"--{key}", value] if has_value else [f"--{key}"]  # no value: vLLM says what it wants
        given.add(dest)
    return argv, given


def switch(key: str, value: str, action: argparse.Action) -> str:
    flag = value.strip().lower()
    if flag in TRUE:
        return f"--{key}"
    if flag in FALSE and isinstance(action, argparse.BooleanOptionalAction):
        return f"--no-{key}"
    raise VLLMArgumentError(f"--vllm-arg {key} is a switch: give {key}, {key}=true or {key}=false, got {value!r}")


def engine_args(model_dir: Path, pairs: list[str], defaults: dict[str, Any]) -> tuple[AsyncEngineArgs, set[str]]:
    """vLLM's engine arguments for ``model_dir``: ``pairs`` parsed by vLLM, then ``defaults`` for every
    field they leave out; also the fields the pairs set."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    argv, given = to_argv(pairs)
    namespace = vllm_parser().parse_args(["--model", str(model_dir), "--tokenizer", str(model_dir), *argv])
    args = AsyncEngineArgs.from_cli_args(namespace)
    for name, value in defaults.items():
        if name not in given:
            setattr(args, name, value)
    return args, given


def check_config(args: AsyncEngineArgs) -> None:
    """vLLM's own checks of the values against the model and this machine, as one line."""
    try:
        args.create_engine_config()
    except Exception as exc:  # pydantic's ValidationError, or vLLM's ValueError/RuntimeError
        raise VLLMArgumentError(f"vLLM refused the engine arguments: {one_line(exc)}") from exc


def one_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: "field: message" per error, without the docs URL
        try:
            return "; ".join(map(pydantic_error, errors()))
        except Exception:
            pass
    return " ".join(str(exc).split())


def pydantic_error(error: dict[str, Any]) -> str:
    where = ".".join(map(str, error.get("loc") or ()))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
