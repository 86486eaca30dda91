"""The truncated HF "filter model": the layers GemFilter's filter pass runs, and nothing more.

GemFilter's filter pass runs decoder layers ``0..r-1`` and stops inside layer ``r``'s
attention (compressors.gemfilter). A backend that generates elsewhere (vLLM) needs only those
layers on the HF side, so we load the model dir with ``num_hidden_layers = r + 1``: the
weights of layers ``r+1..L-1`` and of the LM head are never read from the safetensors files,
and memory holds the model once (in vLLM) plus its first ``r + 1`` layers here. The hf backend
loads one too when ``--filter-dtype`` differs from the model's dtype (server/engine/hf.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from compressors.gemfilter import default_filter_layer
from compressors.probe import decoder_layers, install_probe_attention
from compressors.profile import ModelProfile, attach_profile
from server.model_profiles import find_profile
from server.models import default_cache_dir

logger = logging.getLogger(__name__)


@dataclass
class FilterModel:
    """Layers ``0..max_layer`` of a causal LM's decoder (no LM head), ready for the filter pass."""

    model: PreTrainedModel
    max_layer: int  # the deepest filter layer this model can serve (it holds layers 0..max_layer)
    full_num_layers: int  # the layer count of the model vLLM serves
    default_layer: int  # the calibrated filter layer of the full model

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def place(self, dtype: torch.dtype, device: str = "cpu") -> None:
        """Run the filter pass in ``dtype`` (``--filter-dtype``: bf16 on a CPU with AMX is ~3.4x faster
        than float32 for this pass) on ``device`` (:func:`filter_device`)."""
        target = torch.device(device)
        if dtype != self.dtype or target != self.device:
            self.model.to(device=target, dtype=dtype)
            logger.info("filter model on %s in %s: %.1f MiB of weights", target, dtype, self.parameter_bytes() / 2**20)


def filter_device(setting: str) -> str:
    """Where the filter pass runs: ``auto`` is the first visible CUDA GPU when torch sees one (with
    tensor parallelism, the GPU of vLLM's rank 0), else the CPU."""
    if setting != "auto":
        return setting
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def truncated_config(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """A copy of ``config`` with only the first ``num_layers`` decoder layers.

    Per-layer lists (Gemma 3's ``layer_types``: sliding vs global attention) are cut to match,
    so layer ``i`` keeps the attention kind it has in the full model.
    """
    text_config = config.get_text_config()
    text_config.num_hidden_layers = num_layers
    layer_types = getattr(text_config, "layer_types", None)
    if isinstance(layer_types, list):
        text_config.layer_types = layer_types[:num_layers]
    return config


@contextmanager
def quiet_transformers_load_report() -> Iterator[None]:
    """transformers warns about every checkpoint key it skipped; skipping layers > r is the point."""
    loader_logger = logging.getLogger("transformers")
    level = loader_logger.level
    loader_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        loader_logger.setLevel(level)


def load_filter_model(
    model_dir: Path | str,
    layer: int | None = None,
    dtype: torch.dtype = torch.float32,
    profile: Path | None = None,
    name: str | None = None,
    cache_dir: Path | None = None,
    known_profile: ModelProfile | None = None,
    look_up_profile: bool = True,
) -> FilterModel:
    """Load layers ``0..layer`` of the model in ``model_dir`` (``layer`` None: the profile's layer,
    see :mod:`server.model_profiles`; ``profile`` names a file, else it is looked up by ``name``;
    ``look_up_profile=False``: no lookup, ``known_profile`` is the one the full model found, if any)."""
    full_config = AutoConfig.from_pretrained(model_dir)
    if not look_up_profile:
        found: ModelProfile | None = known_profile
    else:
        cache = cache_dir or default_cache_dir()
        found, _ = find_profile(name or Path(model_dir).name, Path(model_dir), full_config, cache, profile)
    if found is not None:
        attach_profile(full_config, found)
    full_num_layers = int(full_config.get_text_config().num_hidden_layers)
    default_layer = default_filter_layer(full_config)
    max_layer = default_layer if layer is None else layer
    if not 0 <= max_layer < full_num_layers:
        raise ValueError(f"filter layer {max_layer} is out of range: the model has layers 0..{full_num_layers - 1}")
    config = truncated_config(AutoConfig.from_pretrained(model_dir), max_layer + 1)
    if found is not None:  # the truncated model asks its own config for the layer and payoff ratio
        attach_profile(config, found)
    # AutoModel = the decoder stack without the LM head; the filter pass never computes logits.
    with quiet_transformers_load_report():
        model = AutoModel.from_pretrained(model_dir, config=config, dtype=dtype)
    model.eval()
    install_probe_attention(model)
    loaded = len(decoder_layers(model))
    if loaded != max_layer + 1:
        raise RuntimeError(f"filter model holds {loaded} layers, expected {max_layer + 1}")
    logger.info("filter model: layers 0..%d of %d from %s", max_layer, full_num_layers, model_dir)
    return FilterModel(model=model, max_layer=max_layer, full_num_layers=full_num_layers, default_layer=default_layer)


def filter_thread_count(setting: int | None, vllm_running: int, cores: int) -> int:
    """Threads for the next filter pass (``setting`` None: auto).

    Filter passes run one at a time and a request reaches vLLM only after its own pass, so while
    vLLM runs nothing, no vLLM work can start during this pass: every core is ours (4K tokens,
    bf16, 2 cores: 1.6 s vs 2.9 s on 1, measured). Otherwise 1: with vLLM's worker busy, 2
    threads were no faster (3.1-3.7 s either way) and would take cycles from its decode steps.
    """
    if setting is not None:
        return setting
    return cores if vllm_running == 0 else 1


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
