"""llama.cpp as a peer in bench/peers.py: a worker in its own venv (``.venv-llamacpp``, where
``pip install llama-cpp-python`` compiled llama.cpp from its source archive) that loads a GGUF file
once and answers prompts given as token ids, one JSON line in, one out, until stdin closes.

In: ``{"ids": [...], "max_tokens": 24}``. Out: ``{"ttft_ms": ..., "text": ...}`` (TTFT = call ->
first generated token; llama.cpp evaluates the prompt in batches of ``n_batch`` tokens). It runs the
GGUF file as it is (the embedded SmolLM2 is Q4_1: 4-bit weights, where GemServe and vLLM run the
dequantised float32 model), with every core of this process.

    .venv-llamacpp/bin/python bench/peers_llamacpp.py MODEL.gguf CONTEXT_TOKENS
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    from llama_cpp import Llama

    path, context = sys.argv[1], int(sys.argv[2])
    threads = len(os.sched_getaffinity(0))
    llm = Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"ready": True, "threads": threads, "llama_cpp": __import__("llama_cpp").__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        llm.reset()  # no prompt cache across requests: every TTFT is a whole prefill
        start = time.perf_counter()
        first = None
        pieces = []
        for i, token in enumerate(llm.generate(request["ids"], temp=0.0, top_k=1, reset=True)):
            if first is None:
                first = time.perf_counter()
            if token == llm.token_eos() or i + 1 >= request["max_tokens"]:
                if token != llm.token_eos():
                    pieces.append(token)
                break
            pieces.append(token)
        text = llm.detokenize(pieces).decode("utf-8", errors="replace")
        ttft_ms = ((first or time.perf_counter()) - start) * 1000.0
        print(json.dumps({"ttft_ms": round(ttft_ms, 1), "text": text}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
