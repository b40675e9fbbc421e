"""Reference helpers for tests that check the engine against the plain model."""

from __future__ import annotations

from typing import Any, Optional

import torch

from batchgen.engine import LLM
from batchgen.engine.graphs import Capture, DecodeGraphs, eager_capture
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


def random_prompts(n: int, seed: int = 1, lo: int = 1, hi: int = 40) -> list[list[int]]:
    """``n`` prompts of random ids in [3, 300), lengths uniform in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def stand_in_graphs(llm: LLM, capture: Capture = eager_capture, max_rows: Optional[int] = None,
                    **kwargs: Any) -> DecodeGraphs:
    """Make ``llm`` replay its decode steps of up to ``max_rows`` rows (default: all) through
    ``capture`` (default: the stand-in that keeps a CUDA graph's contract on any device, see
    tests/test_graphs.py); returns the graphs."""
    llm.runner.graphs = DecodeGraphs(llm.model, llm.blocks.block_size, llm.max_model_len,
                                     max_rows or llm.scheduler.max_num_seqs, llm.device, capture, **kwargs)
    return llm.runner.graphs
