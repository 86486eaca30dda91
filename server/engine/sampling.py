"""Next-token choice: greedy at temperature 0, otherwise temperature + nucleus (top-p).

Any temperature > 0 and top_p > 0 the schema allows is computed exactly, with no floor: the
probabilities are taken in float64 after subtracting the largest logit, so ``logits / T`` can
underflow to 0 probability but never overflow (the top token's scaled logit is exactly 0), and
a top_p as small as 5e-324 is still > 0 (in float32 it would round to 0 and keep nothing).
"""

from __future__ import annotations

import torch

from server.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0 or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """``logits (vocab,)`` -> token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    shifted = logits.double() - logits.max().double()
    probs = torch.softmax(shifted / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())
