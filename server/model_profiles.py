"""Which GemFilter profile (:mod:`compressors.profile`) a loaded model gets.

In order: the file named by ``--profile`` / ``GEMSERVE_PROFILE`` (an error if it does not fit the
model); the profile ``gemserve calibrate`` wrote into the cache for these very model files
(``<cache>/profiles/<fingerprint>.json``); the profile shipped for an embedded model
(``server/profiles/<alias>.json``), or else the shipped profile of the same architecture shape (a
converted model dir or a truncated filter model carries no alias; the same shape is the same
model family, as the old per-architecture table assumed). With none, GemFilter falls back to its
half-depth rule.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from transformers import PretrainedConfig

from compressors.profile import ModelProfile, check_fits, read_profile

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def model_fingerprint(model_dir: Path) -> str:
    """16 hex digits from the model's config and the names and sizes of its weight and tokenizer
    files: the same files give the same key on any machine, without hashing gigabytes."""
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
        if path.suffix in WEIGHT_SUFFIXES or path.name.startswith("tokenizer"):
            digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def cached_profile_path(cache_dir: Path, model_dir: Path) -> Path:
    return cache_dir / "profiles" / f"{model_fingerprint(model_dir)}.json"


def find_profile(
    name: str, model_dir: Path, config: PretrainedConfig, cache_dir: Path, explicit: Path | None = None
) -> tuple[ModelProfile | None, str | None]:
    """The profile for this model and where it came from, or ``(None, None)``."""
    if explicit is not None:
        profile = read_profile(explicit)
        check_fits(profile, config, f"profile '{explicit}'")
        return profile, str(explicit)
    same_shape = sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []
    for path in (cached_profile_path(cache_dir, model_dir), SHIPPED_DIR / f"{name}.json", *same_shape):
        if not path.is_file():
            continue
        try:
            profile = read_profile(path)
            check_fits(profile, config, f"profile '{path}'")
        except ValueError as exc:
            if path.parent != SHIPPED_DIR or path.stem == name:  # other shipped shapes are not a surprise
                logger.warning("ignoring %s", exc)
            continue
        return profile, str(path)
    return None, None
