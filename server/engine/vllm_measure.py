"""What a vLLM-served request costs, measured or computed, each named by its source.

vLLM on CPU exposes no per-request allocator peak and no per-request KV bytes, so
``peak_memory_bytes`` is the sampled resident memory of the API process and vLLM's engine
processes, and ``kv_cache_bytes`` is computed exactly from the model's shape and dtype times the
tokens the request holds (the formula travels in ``memory_source``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from server.measure import process_rss_bytes

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

KV_BYTES_FORMULA = "layers*2*kv_heads*head_dim*dtype_bytes*(kept_prompt+generated)"
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1}


class ProcessTreeMemoryMeter:
    """Peak RSS of this process plus its children (vLLM's engine core and worker), sampled.

    vLLM on CPU exposes no per-request allocator peak; its processes' resident memory is what
    we can measure. Short spikes between samples can be missed; the name in ``source`` says so.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root = psutil.Process()
        self._pids: list[int] = []

    @property
    def source(self) -> str:
        return f"cpu:rss_peak_sampled_{self.interval_s * 1000:g}ms(api+vllm_engine_processes)"

    def read_bytes(self) -> int:
        """RSS of the processes found at :meth:`__enter__`, one ``/proc/<pid>/statm`` read each. Not
        psutil's ``children(recursive=True)`` per sample: that walks every process on the host, and
        at 100 samples a second took 27% of a core and the filter pass's GIL beside it (issue 23)."""
        return sum(process_rss_bytes(pid) for pid in self._pids)

    def __enter__(self) -> ProcessTreeMemoryMeter:
        self._pids = [self._root.pid, *(child.pid for child in self._root.children(recursive=True))]
        self.baseline_bytes = self.peak_bytes = self.read_bytes()
        self._thread = threading.Thread(target=self._sample, name="rss-tree-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.read_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.read_bytes())


def kv_bytes_per_token(llm: AsyncLLM) -> int:
    """K and V bytes one token occupies across all layers, from the config vLLM actually runs:
    ``layers * 2 * kv_heads * head_dim * dtype_bytes``. vLLM on CPU exposes no per-request cache
    bytes, so ``kv_cache_bytes`` is this times the tokens the request holds (named in
    ``memory_source``); vLLM's block allocator rounds each request up to whole blocks."""
    model_config = llm.vllm_config.model_config
    cache_dtype = str(llm.vllm_config.cache_config.cache_dtype)
    if cache_dtype == "auto":
        cache_dtype = str(model_config.dtype).removeprefix("torch.")
    dtype_bytes = _DTYPE_BYTES.get(cache_dtype.split("_")[0])
    if dtype_bytes is None:
        raise ValueError(f"unknown KV cache dtype '{cache_dtype}'")
    text_config = model_config.hf_text_config
    layers = int(text_config.num_hidden_layers)
    kv_heads = int(model_config.get_total_num_kv_heads())
    return layers * 2 * kv_heads * int(model_config.get_head_size()) * dtype_bytes


def config_kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """The same product as :func:`kv_bytes_per_token`, from the HF config, before vLLM starts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)
