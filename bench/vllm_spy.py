"""What vLLM itself reports, recorded beside the engine instead of inside it: the prompt ids vLLM
generated from (per vLLM request id) and the requests it was asked to abort. tests/test_vllm.py and
bench/vllm_prefill.py wrap the engine's ``AsyncLLM`` in it; the server keeps no such record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


class VLLMSpy:
    """``engine.llm = VLLMSpy(engine.llm)``: every other attribute passes through to vLLM."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.prompts: dict[str, list[int]] = {}  # vLLM request id -> the prompt ids vLLM reported
        self.aborted: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)

    def generate(self, prompt: Any, params: Any, request_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return self._recorded(self.llm.generate(prompt, params, request_id, *args, **kwargs), request_id)

    async def _recorded(self, outputs: Any, request_id: str) -> AsyncIterator[Any]:
        try:
            async for output in outputs:
                if output.prompt_token_ids is not None:
                    self.prompts.setdefault(request_id, list(output.prompt_token_ids))
                yield output
        finally:
            await outputs.aclose()  # closing the spy closes vLLM's stream, as the engine expects

    async def abort(self, request_id: str, *args: Any, **kwargs: Any) -> Any:
        self.aborted.append(request_id)
        return await self.llm.abort(request_id, *args, **kwargs)


def spied(engine: Any) -> VLLMSpy:
    """The engine's AsyncLLM wrapped (once) in a spy."""
    if not isinstance(engine.llm, VLLMSpy):
        engine.llm = VLLMSpy(engine.llm)
    return engine.llm
