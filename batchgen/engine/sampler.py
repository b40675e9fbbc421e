"""Turning logits into tokens, per request.

Greedy rows take the argmax. Sampled rows are scaled by temperature, filtered by top-k and
top-p, and drawn with the request's own generator, so a row's draws depend only on its seed
and its own logits, never on its neighbours in the batch.
"""

from __future__ import annotations

import torch

from batchgen.engine.constraints import apply_masks
from batchgen.engine.request import Request


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k and outside the top-p nucleus of a row [V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[float] | None]:
    """Next token of each request from its logits row [B, V] (fp32).

    Returns the tokens and, when any request asked for them, the chosen tokens' logprobs under
    the model's own distribution (before temperature and filtering; for a constrained row, the
    distribution under its constraint's mask).

    Constrained rows' logits are masked in place first (tokens their grammar forbids next become
    -inf); the other rows are not touched, so their tokens are exactly what they would be alone.
    """
    states = [req.constraint_state for req in reqs]
    if any(s is not None for s in states):
        apply_masks(logits, states)
    tokens = torch.argmax(logits, dim=-1)  # [B]
    for i, req in enumerate(reqs):
        p = req.params
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        tokens[i] = torch.multinomial(probs, 1, generator=req.generator)[0]
    logprobs = None
    if any(r.params.logprobs for r in reqs):
        lp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        logprobs = lp.tolist()
    return tokens.tolist(), logprobs
