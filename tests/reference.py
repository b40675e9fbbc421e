"""Reference helpers for tests that check the engine against the plain model."""

from __future__ import annotations

import torch

from batchgen.model import ModelArgs, Transformer


def sharp_model(*, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, vocab_size: int = 300,
                max_seq_len: int = 128, seed: int = 0) -> Transformer:
    """A seeded random LLaMA (dim 64) with its output head scaled by 8.

    Random models are full of near-ties; sharper logits keep a tie decided by the last bit of a
    different summation order (batching, all-reduce) out of tests that are about something else.
    """
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=vocab_size, multiple_of=16, max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)
    return model


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``, re-running the whole sequence each step (no cache)."""
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(model.logits_full(torch.tensor([toks]))[0, -1].argmax()))
    return toks[len(prompt):]
