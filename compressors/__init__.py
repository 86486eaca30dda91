"""GemServe's method library: prompt selection and KV-cache compression for HF models."""

from compressors.base import CompressionError, KVCompressor, Method, PromptSelector, Selection
from compressors.registry import METHODS, build_method, method_names

__all__ = [
    "METHODS",
    "CompressionError",
    "KVCompressor",
    "Method",
    "PromptSelector",
    "Selection",
    "build_method",
    "method_names",
]
