"""``gemserve eval``: method specs, the shared-prefill sweep, in-process vs --base-url, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main as cli_main
from contract.methods import parse_method, parse_methods
from evals.runner import RECORDS_FILE
from evals.targets import InProcessTarget
from evals.tasks import build_sample
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

GRID = ["--tasks", "niah_single,niah_multikey", "--lengths", "1024", "--depths", "0.5", "--seed", "3"]


def test_method_specs_parse_budgets_knobs_and_attention() -> None:
    spec = parse_method("gemfilter:1024+span=word+attention=streaming+attention.sink=8")
    assert (spec.name, spec.budget, spec.knobs) == ("gemfilter", 1024, {"span": "word"})
    assert (spec.attention, spec.attention_knobs) == ("streaming", {"sink": 8})
    assert spec.label == "gemfilter:1024+span=word+attention=streaming+attention.sink=8"
    assert spec.variant == "gemfilter+span=word+attention=streaming+attention.sink=8"
    assert spec.compression() == {
        "method": "gemfilter",
        "span": "word",
        "budget": 1024,
        "attention": "streaming",
        "attention_knobs": {"sink": 8},
    }
    assert parse_method("default").compression() is None  # a plain request, so vLLM understands it
    assert parse_method("none").compression() == {"method": "none"}  # never the server's default method
    labels = [s.label for s in parse_methods(["none", "snapkv", "gemfilter:64+span=word"], [256, 1024])]
    assert labels == ["none", "snapkv:256", "snapkv:1024", "gemfilter:64+span=word"]
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods(["snapkv:256", "snapkv"], [256])
    with pytest.raises(ValueError, match="a ratio in"):
        parse_method("snapkv:many")


SWEEP_METHODS = [
    ("none", {}),
    ("gemfilter", {"budget": 160, "payoff_ratio": 0}),
    ("gemfilter", {"budget": 256, "payoff_ratio": 0, "span": "word"}),
    ("gemfilter", {"budget": 10_000}),  # keeps everything: no filter pass
    ("snapkv", {"budget": 160}),
    ("snapkv", {"budget": 256}),
    ("pyramidkv", {"budget": 160}),
    ("streamingllm", {"budget": 160}),
    ("h2o", {"budget": 160}),
]


@pytest.mark.slow
def test_shared_sweep_answers_like_generate_token_for_token(engine) -> None:
    """One filter pass / one full prefill for all methods gives each the tokens it gets alone."""
    from evals.sweep import run_many

    sample = build_sample("niah_single", "prose", 700, 0.4, 5, lambda s: len(engine.encode_chat(s.chat_messages())))
    prompt_ids = engine.encode_chat(sample.chat_messages())

    def request(name: str, knobs: dict) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=prompt_ids,
            sampling=SamplingParams(max_tokens=12, temperature=0.0),
            compression=CompressionSpec(method=name, knobs=dict(knobs), return_selection=True),
        )

    shared = run_many(engine, [request(name, knobs) for name, knobs in SWEEP_METHODS])
    for (name, knobs), got in zip(SWEEP_METHODS, shared, strict=True):
        alone = engine.generate(request(name, knobs))
        assert got.token_ids == alone.token_ids, (name, knobs)
        assert got.compression.selection.kept_indices == alone.compression.selection.kept_indices, name
        assert got.compression.kept_tokens == alone.compression.kept_tokens
        assert got.compression.kv_bytes_after == alone.compression.kv_bytes_after
    assert shared[3].compression.kept_tokens == len(prompt_ids)


def read_records(directory: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in (directory / RECORDS_FILE).read_text().splitlines() if line.strip()]
    return {(row["uid"], row["method"]): row for row in rows}


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory, shared_engine_for_eval) -> Path:
    out = tmp_path_factory.mktemp("eval") / "in-process"
    assert cli_main(["eval", *GRID, "--methods", "none,gemfilter:256+payoff_ratio=0", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def shared_engine_for_eval(engine, monkeypatch_module):
    """The eval CLI loads its own model; hand it the session's engine instead (same weights)."""
    import evals.runner

    monkeypatch_module.setattr(evals.runner, "make_target", lambda args, methods: InProcessTarget(engine))
    return engine


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
def test_eval_writes_records_reports_and_scores(in_process_run: Path) -> None:
    records = read_records(in_process_run)
    assert len(records) == 4  # 2 tasks x 1 length x 1 depth x 2 methods
    for name in ("results.json", "results.csv", "heatmap.png", "summary.md", "meta.json"):
        assert (in_process_run / name).is_file(), name
    for row in records.values():
        assert row["error"] is None
        assert 0.98 * 1024 <= row["prompt_tokens"] <= 1024
        assert row["score"] in (0.0, 1.0)
        found = any(answer in row["output"] for answer in row["answers"])
        assert (row["score"] == 1.0) == found or row["answers"][0].isalpha()
    gemfilter = [row for (_, method), row in records.items() if method.startswith("gemfilter")]
    assert all(row["kept_tokens"] == 256 and row["answer_token_recall"] is not None for row in gemfilter)


@pytest.mark.slow
def test_base_url_scores_like_in_process(in_process_run: Path, server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "http"
    argv = ["eval", *GRID, "--methods", "none,gemfilter:256+payoff_ratio=0", "--base-url", server_url]
    assert cli_main([*argv, "--output-dir", str(out)]) == 0
    local, remote = read_records(in_process_run), read_records(out)
    assert local.keys() == remote.keys()
    for key, row in local.items():
        assert remote[key]["prompt_tokens"] == row["prompt_tokens"], key
        assert remote[key]["output"] == row["output"], key
        assert remote[key]["score"] == row["score"], key
        assert remote[key]["answer_kept"] == row["answer_kept"], key


@pytest.mark.slow
def test_resume_runs_only_the_missing_rows_and_none_reproduces(in_process_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    lines = (in_process_run / RECORDS_FILE).read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["method"] == "none"][:1]
    (out / RECORDS_FILE).write_text("\n".join([*kept, '{"cut short']) + "\n")
    argv = ["eval", *GRID, "--methods", "none,gemfilter:256+payoff_ratio=0", "--output-dir", str(out)]
    assert cli_main([*argv, "--resume"]) == 0
    again = read_records(out)
    original = read_records(in_process_run)
    assert again.keys() == original.keys()
    for key, row in original.items():  # same seed: same prompts, same greedy answers
        assert again[key]["output"] == row["output"], key
        assert again[key]["prompt_tokens"] == row["prompt_tokens"], key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "niah_nope"], "unknown task niah_nope"),
        (["--haystacks", "poems"], "unknown haystack poems"),
        (["--methods", "snapkv:lots"], "after ':' give a budget (a positive integer) or a ratio in (0, 1)"),
        (["--depths", "1.5"], "depths must be in [0, 1]"),
    ],
)
def test_bad_grid_is_a_one_line_error(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert run_cli(["eval", *argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.splitlines()[-1]  # one line (argparse's own errors print the usage above it)
    assert "Traceback" not in err


def run_cli(argv: list[str]) -> int | str | None:
    try:
        return cli_main(argv)
    except SystemExit as exit_:  # argparse's type errors
        return exit_.code


def test_unknown_method_fails_before_any_row(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = cli_main(["eval", *GRID, "--methods", "none,snapkvv:256", "--output-dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown compression method 'snapkvv'" in err
    assert not (out / RECORDS_FILE).exists()
