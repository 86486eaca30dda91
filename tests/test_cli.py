"""The ``gemserve`` CLI through ``cli.main.main``: the demo, --json, and one-line errors."""

from __future__ import annotations

import json
import re

import pytest

from cli.main import main
from compressors.gemfilter import default_filter_layer


@pytest.fixture()
def context_file(tmp_path):
    path = tmp_path / "context.txt"
    path.write_text(
        "The lighthouse on the northern rocks was painted green in 1911. The keeper's name was Ada Brennan.",
        encoding="utf-8",
    )
    return path


@pytest.fixture()
def shared_engine(monkeypatch, engine):
    """Let the CLI reuse the session's engine instead of loading the model per test."""
    import cli.commands.common

    monkeypatch.setattr(cli.commands.common, "load_engine", lambda args, default_method="none": engine)
    return engine


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_generate_json_on_the_demo(shared_engine, capsys) -> None:
    code, out, err = run_cli(capsys, "generate", "--method", "gemfilter", "--budget", "1024", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["text"].strip()
    assert data["finish_reason"] in {"stop", "length"}
    assert data["usage"]["completion_tokens"] >= 1
    assert 3300 <= data["usage"]["prompt_tokens"] <= 3600
    compression = data["compression"]
    assert compression["method"] == "gemfilter"
    assert compression["kept_tokens"] == 1024
    assert compression["prompt_tokens"] == data["usage"]["prompt_tokens"]
    assert compression["layer"] == default_filter_layer(shared_engine.model.config)
    metrics = data["metrics"]
    for key in ("select_ms", "prefill_ms", "ttft_ms", "decode_ms", "e2e_ms", "kv_cache_bytes", "peak_memory_bytes"):
        assert metrics[key] > 0, key
    assert metrics["memory_source"].startswith("cpu:")
    assert data["demo"]["answer"] and isinstance(data["demo"]["found"], bool)


def test_generate_table_with_selection_from_a_context_file(shared_engine, capsys, context_file) -> None:
    code, out, err = run_cli(
        capsys,
        "generate",
        "--context-file",
        str(context_file),
        "What colour was the lighthouse painted?",
        "--method",
        "gemfilter",
        "--budget",
        "24",
        "--max-tokens",
        "8",
        "--show-selection",
    )
    assert code == 0, err
    for label in ("method", "prompt tokens", "kept tokens", "select", "TTFT", "KV cache", "peak memory"):
        assert label in out
    assert "gemfilter (layer" in out
    # The prompt's runs as server/engine/spans.py renders them: kept [start:end] and dropped counts
    # that tile the whole prompt, the kept ones adding up to the kept tokens in the table.
    prompt_tokens = int(re.search(r"prompt tokens\s+(\d+)", out).group(1))
    kept_tokens = int(re.search(r"kept tokens\s+(\d+)", out).group(1))
    runs = out.split("what was dropped between them:\n", 1)[1].splitlines()
    kept = [tuple(map(int, m.groups())) for m in map(re.compile(r"  \[(\d+):(\d+)\] ").match, runs) if m]
    dropped = [int(m.group(1)) for m in map(re.compile(r"  \.\.\. (\d+) tokens? dropped").match, runs) if m]
    assert kept and dropped
    assert sum(end - start for start, end in kept) == kept_tokens == 24
    assert sum(end - start for start, end in kept) + sum(dropped) == prompt_tokens
    assert kept[-1][1] == prompt_tokens  # the protected tail: the question and the template's end


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0"], "budget of method 'gemfilter' must be >= 1, got 0"),
        (["--layer", "99"], "layer 99 is out of range: this model has layers 0..29"),
        (["--method", "bogus"], "unknown compression method 'bogus'; allowed: none, gemfilter"),
        (["--knob", "window"], "--knob takes NAME=VALUE, got 'window'"),
        (["--method", "none", "--knob", "attention=sparse"], "unknown attention backend 'sparse'; allowed: dense,"),
        (
            ["--method", "none", "--knob", "attention=block_sparse", "--attention-knob", "threshold=3"],
            "threshold of attention backend 'block_sparse' must be in (0, 1], got 3",
        ),
        (
            ["--knob", "filter_attention=nope"],
            "filter_attention of method 'gemfilter' must be one of dense, streaming,",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(shared_engine, capsys, context_file, args, message) -> None:
    code, out, err = run_cli(capsys, "generate", "--context-file", str(context_file), "Who kept it?", *args)
    assert code == 2
    assert err.count("\n") == 1  # one line, no traceback
    assert err.startswith("gemserve generate: error: ")
    assert message in err
    assert out == ""


def test_missing_model_is_a_one_line_error(capsys, tmp_path) -> None:
    code, out, err = run_cli(capsys, "generate", "--model", str(tmp_path / "missing.gguf"))
    assert code == 2
    assert out == ""
    assert err == f"gemserve generate: error: GGUF file '{tmp_path / 'missing.gguf'}' does not exist\n"


def test_missing_context_file_is_a_one_line_error(shared_engine, capsys, tmp_path) -> None:
    code, out, err = run_cli(capsys, "generate", "--context-file", str(tmp_path / "nope.txt"), "q?")
    assert code == 2
    assert out == ""
    assert err == f"gemserve generate: error: context file '{tmp_path / 'nope.txt'}' does not exist\n"


def test_bench_eval_and_calibrate_are_registered(capsys) -> None:
    for command, flag in (("bench", "--lengths"), ("calibrate", "--metric-budget"), ("eval", "--base-url")):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert flag in capsys.readouterr().out
