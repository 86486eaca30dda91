"""GemFilter profiles: `gemserve calibrate` writes one, the server loads it and filters at its layer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from cli.main import main as cli_main
from compressors.gemfilter import default_filter_layer
from compressors.profile import ModelProfile, architecture_key, read_profile, write_profile
from server.model_profiles import SHIPPED_DIR, cached_profile_path, find_profile, model_fingerprint
from tests.conftest import serve_app


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A real (small) calibration restricted to layers 5 and 9, so its answer differs from the shipped 18."""
    out = tmp_path_factory.mktemp("profile") / "smollm2.json"
    argv = ["calibrate", "--lengths", "700", "--haystacks", "prose,records", "--depths", "0.5"]
    argv += ["--budgets", "64,128", "--metric-budget", "128", "--layers", "5,9", "--output", str(out)]
    assert cli_main(argv) == 0
    return out


def test_calibrate_writes_a_profile_with_its_recall_table(calibrated: Path, capsys) -> None:
    profile = read_profile(calibrated)
    assert profile.filter_layer in (5, 9)
    assert profile.architecture == ["llama", 30, 576]
    calibration = profile.calibration
    assert calibration["candidate_layers"] == [5, 9]
    assert len(calibration["probes"]) == 2
    recall = calibration["mean_answer_recall"]["128"]
    best = max(recall)
    assert recall[[5, 9].index(profile.filter_layer)] >= best - 0.03
    assert profile.payoff_ratio == pytest.approx(30 / (30 - profile.filter_layer - 1), abs=1e-3)
    assert calibrated.with_suffix(".png").stat().st_size > 10_000


def test_the_server_filters_at_the_layer_the_profile_names(calibrated: Path) -> None:
    from server.app import create_app
    from server.engine.hf import HFEngine
    from server.engine.hf_async import HFAsyncEngine
    from server.models import load_model
    from server.settings import Settings

    loaded = load_model("smollm2-135m-instruct", device="cpu", profile=calibrated)  # its own model: no leak
    layer = read_profile(calibrated).filter_layer
    assert loaded.profile_source == str(calibrated)
    assert default_filter_layer(loaded.model.config) == layer
    app = create_app(Settings(), engine=HFAsyncEngine(HFEngine(loaded), 1, 4, 1.0))
    text = "The lighthouse keeper counted ships. " * 120 + "What did the keeper count?"
    with serve_app(app) as url:
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 2,
            "compression": {"method": "gemfilter", "budget": 64, "payoff_ratio": 0},
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
    assert reply["compression"]["layer"] == layer != 18
    assert reply["compression"]["kept_tokens"] == 64


def test_lookup_order_explicit_then_cache_then_shipped(loaded_model, tmp_path: Path) -> None:
    config, path = loaded_model.model.config, loaded_model.path
    shipped, source = find_profile("smollm2-135m-instruct", path, config, tmp_path)
    assert source == str(SHIPPED_DIR / "smollm2-135m-instruct.json") and shipped is not None
    # A converted dir or a truncated filter model has no alias: the shipped profile of its shape applies.
    assert find_profile("some-local-dir", path, config, tmp_path)[1] == source
    cached = ModelProfile(model="mine", architecture=architecture_key(config), filter_layer=7)
    write_profile(cached, cached_profile_path(tmp_path, path))
    assert find_profile("smollm2-135m-instruct", path, config, tmp_path)[0].filter_layer == 7
    explicit = tmp_path / "explicit.json"
    write_profile(ModelProfile(model="x", architecture=architecture_key(config), filter_layer=3), explicit)
    assert find_profile("smollm2-135m-instruct", path, config, tmp_path, explicit)[0].filter_layer == 3
    assert model_fingerprint(path) == model_fingerprint(path)  # stable: a cache key


def test_a_profile_for_another_model_is_refused_by_name(loaded_model, tmp_path: Path) -> None:
    wrong = tmp_path / "gemma.json"
    write_profile(ModelProfile(model="g", architecture=["gemma3_text", 18, 640], filter_layer=11), wrong)
    with pytest.raises(ValueError, match=r"is for \['gemma3_text', 18, 640\], this model is \['llama', 30, 576\]"):
        find_profile("smollm2-135m-instruct", loaded_model.path, loaded_model.model.config, tmp_path, wrong)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="is not a GemServe model profile"):
        read_profile(broken)


def test_generate_with_a_missing_profile_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    code = cli_main(["generate", "--profile", str(tmp_path / "nope.json"), "--max-tokens", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemserve generate: error: profile") and err.endswith("does not exist")
    assert len(err.splitlines()) == 1  # and before any weights loaded


def test_both_embedded_models_ship_a_profile() -> None:
    for name, architecture in (
        ("smollm2-135m-instruct", ["llama", 30, 576]),
        ("gemma3-270m", ["gemma3_text", 18, 640]),
    ):
        profile = read_profile(SHIPPED_DIR / f"{name}.json")
        assert profile.architecture == architecture
        assert profile.calibration["probes"], name
