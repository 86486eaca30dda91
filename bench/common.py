"""Helpers shared by the benchmark scripts: fresh-process runs, the machine description,
needle prompts for an engine, where results go, and their figures.

Each measured configuration runs in a fresh Python process (:func:`run_in_fresh_process`), so
its peak resident memory is not inflated by what glibc kept from an earlier configuration, and
no configuration inherits another's warm caches.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from contract.needles import HaystackCase
    from server.engine.hf import HFEngine

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Worker processes print one JSON line prefixed with this marker; everything else is log noise.
RESULT_MARKER = "@@GEMSERVE_RESULT@@ "


class WorkerError(RuntimeError):
    """A benchmark worker process failed; the message carries the end of its stderr."""


def run_in_fresh_process(module: str, payload: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --worker '<payload json>'`` and return the JSON it reports."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(payload)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise WorkerError(f"worker {module} exited with {proc.returncode}: {proc.stderr[-2000:]}")


def report_result(result: dict[str, Any]) -> None:
    """Called by a worker: hand its result back to :func:`run_in_fresh_process`."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def cpu_was_shared(loadavg_before: list[float]) -> bool:
    """Did other work share the CPU? Judged by the 1-minute load average BEFORE a run: at its end
    the load is mostly the benchmark's own threads. This idle VM sits near 1.0 (kernel threads)."""
    return loadavg_before[0] > 1.5


def result_header(model_name: str, dtype: str | None = None) -> dict[str, Any]:
    """The fields every benchmark's result JSON opens with: model, dtype, start time, load and machine."""
    machine = machine_description(dtype)
    return {
        "model": model_name,
        "dtype": machine["dtype"],
        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "machine": machine,
    }


def machine_description(dtype: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was: the CPU's flags that
    decide ``--dtype auto`` and the dtype the benchmark's model ran in (``dtype``; None: what
    ``auto`` resolves to here, every benchmark's default)."""
    import torch
    import transformers

    from server.precision import flags_of_interest, resolve_dtype

    auto = resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError):
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model or platform.processor(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpu_flags": flags_of_interest(),
        "dtype": dtype or auto.name,
        "dtype_auto": auto.describe(),
    }


@dataclass
class NeedlePrompt:
    """A chat-templated needle prompt, ready for the engine, with where the needle sits."""

    case: HaystackCase
    prompt_ids: list[int]
    needle_token_positions: list[int]  # positions of the needle sentence's tokens in prompt_ids
    answer_token_positions: list[int]  # positions of the answer's tokens (a subset of the above)
    tail_tokens: int  # tokens after the document: the question plus the chat template's suffix


def needle_prompt(engine: HFEngine, target_tokens: int, depth: float, seed: int) -> NeedlePrompt:
    """Build a needle case of about ``target_tokens`` chat tokens and locate its tokens."""
    from contract.needles import build_case
    from evals.targets import tokens_overlapping

    case = build_case(target_tokens, depth=depth, seed=seed, count_tokens=lambda s: len(engine.encode_prompt(s)))
    messages = [{"role": "user", "content": case.user_message()}]
    prompt_ids = engine.encode_chat(messages)
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != prompt_ids:
        raise RuntimeError("the chat template's text does not re-tokenise to the same ids; cannot locate the needle")
    offsets = encoded["offset_mapping"]
    sentence_start = text.index(case.needle.sentence)
    sentence_end = sentence_start + len(case.needle.sentence)
    answer_start = text.index(case.needle.answer, sentence_start)
    answer_end = answer_start + len(case.needle.answer)
    document_end = text.index(case.document) + len(case.document)
    return NeedlePrompt(
        case=case,
        prompt_ids=prompt_ids,
        needle_token_positions=tokens_overlapping(offsets, sentence_start, sentence_end),
        answer_token_positions=tokens_overlapping(offsets, answer_start, answer_end),
        tail_tokens=len(prompt_ids) - len(tokens_overlapping(offsets, 0, document_end)),
    )


def model_slug(name: str) -> str:
    """A file-name-safe short name for result files (``smollm2-135m-instruct`` -> ``smollm2``)."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return "smollm2" if slug.startswith("smollm2") else slug


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"


def replace_doc_section(heading: str, section: str, path: Path = DOCS_PATH) -> None:
    """Put ``section`` (which starts with ``heading``) into docs/benchmarks.md in place of the old
    section under that heading, up to the next ``## `` heading, or append it; the rest stays."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    if heading in text:
        start = text.index(heading)
        following = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n\n" + (text[following + 1 :] if following != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def loadtest(url: str, out: Path, **options: Any) -> dict[str, Any]:
    """``gemserve loadtest`` (completions, --ignore-eos) with ``options`` as flags; its results.json
    summary by method."""
    command = [sys.executable, "-m", "cli", "loadtest", "--base-url", url, "--no-progress"]
    command += ["--output-dir", str(out), "--ignore-eos", "--endpoint", "completions"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["summary"]


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures a benchmark keeps of one method's loadtest summary."""
    return {
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
        "request_throughput": summary["request_throughput"],
        "output_token_throughput": summary["output_token_throughput"],
        "ttft_ms": summary["ttft_ms"],
        "itl_ms": summary["itl_ms"],
        "e2e_ms": summary["e2e_ms"],
        "kept_tokens": summary["kept_tokens"],
    }


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` starting at ``turn`` (A B C, B C A, C A B ...): per prompt, every configuration runs
    first as often as the others, so this VM's drift hits them alike."""
    at = turn % len(items)
    return [*items[at:], *items[:at]]


def stamp_finish(result: dict[str, Any]) -> None:
    """The load average and time at a run's end, into its result."""
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def grouped_bars(ax: Any, lengths: list[int], configs: Sequence[str], value: Callable[[int, str], float]) -> None:
    """One group of bars per prompt length, one bar per configuration (``value(length, config)``)."""
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        ax.bar([x + i * width for x in range(len(lengths))], [value(n, config) for n in lengths], width, label=config)
    ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(lengths))], [str(n) for n in lengths])
    ax.set_xlabel("prompt tokens (target)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def length_axes(axes: Any) -> None:
    """A two-panel figure over prompt length: log-2 length axes with grids, the right panel a
    fraction (0..1), the legend on the left one."""
    for ax in axes:
        ax.set_xlabel("prompt tokens")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)


@contextlib.contextmanager
def figure(path: Path, nrows: int = 1, ncols: int = 1, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """A headless matplotlib figure (``plt.subplots(nrows, ncols, **subplots)``): laid out, saved to
    ``path`` at 110 dpi and closed when the block ends; closed, not saved, if it raises. matplotlib is
    imported here, not at the top, because this module is imported where matplotlib may be absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
