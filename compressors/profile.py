"""A model's GemFilter profile: its filter layer, when filtering pays off, a budget that holds.

``gemserve calibrate --model M`` measures these from needle probes (:mod:`evals.calibrate`) and
writes a JSON file; the server and the CLI load it with the model (:mod:`server.profiles` finds
it: ``--profile``, the cache keyed by the model's files, or the profile shipped for an embedded
model). The loaded profile rides on the model's config, so every place that asks "which layer
for this model?" (the HF engine, the vLLM backend's truncated filter model) gets one answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

CONFIG_ATTRIBUTE = "gemserve_profile"  # a plain dict on the config: it stays JSON-serialisable
FORMAT_VERSION = 1


def architecture_key(config: PretrainedConfig) -> list[Any]:
    """``[model_type, layers, hidden size]``: what a profile must match to apply to a model."""
    text_config = config.get_text_config()
    return [str(text_config.model_type), int(text_config.num_hidden_layers), int(text_config.hidden_size)]


@dataclass(frozen=True)
class ModelProfile:
    model: str
    architecture: list[Any]  # architecture_key of the full model
    filter_layer: int
    payoff_ratio: float | None = None  # None: the cost model L / (L - r - 1)
    budget: int | None = None  # smallest probed budget that kept the answers (advice, printed)
    payoff_source: str = "cost model"
    calibration: dict[str, Any] = field(default_factory=dict)  # what was measured, for the record
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> ModelProfile:
        try:
            profile = cls(
                model=str(data["model"]),
                architecture=list(data["architecture"]),
                filter_layer=int(data["filter_layer"]),
                payoff_ratio=None if data.get("payoff_ratio") is None else float(data["payoff_ratio"]),
                budget=None if data.get("budget") is None else int(data["budget"]),
                payoff_source=str(data.get("payoff_source", "cost model")),
                calibration=dict(data.get("calibration") or {}),
                version=int(data.get("version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} is not a GemServe model profile: {exc!r}") from exc
        if profile.filter_layer < 0 or len(profile.architecture) != 3:
            raise ValueError(f"{source} is not a GemServe model profile: bad filter_layer or architecture")
        return profile


def read_profile(path: Path) -> ModelProfile:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"profile '{path}' does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile '{path}' is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"profile '{path}' is not a JSON object")
    return ModelProfile.from_dict(data, source=f"profile '{path}'")


def write_profile(profile: ModelProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n", encoding="utf-8")


def check_fits(profile: ModelProfile, config: PretrainedConfig, source: str) -> None:
    """A profile measured on another architecture does not apply: say which."""
    key = architecture_key(config)
    if profile.architecture != key:
        raise ValueError(f"{source} is for {profile.architecture}, this model is {key}")
    if profile.filter_layer >= key[1]:
        raise ValueError(f"{source} names filter layer {profile.filter_layer}; this model has 0..{key[1] - 1}")


def attach_profile(config: PretrainedConfig, profile: ModelProfile) -> None:
    """Carry ``profile`` on ``config`` (and its text config) for :func:`attached_profile`."""
    for target in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        setattr(target, CONFIG_ATTRIBUTE, profile.to_dict())


def attached_profile(config: PretrainedConfig) -> ModelProfile | None:
    data = getattr(config, CONFIG_ATTRIBUTE, None) or getattr(config.get_text_config(), CONFIG_ATTRIBUTE, None)
    return ModelProfile.from_dict(data) if isinstance(data, dict) else None
