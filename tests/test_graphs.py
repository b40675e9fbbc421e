"""Decode steps replayed from graphs (``batchgen.engine.graphs``), checked on the CPU.

A CUDA graph replays the recorded work on the recorded memory, so a step only works if every
input reaches it through the static buffers. ``eager_capture`` keeps that contract without a
GPU: the same function is run again on every replay and its result lands in the same output
tensor. The only part not run here is the ``torch.cuda.CUDAGraph`` recording itself
(``tests/test_gpu.py`` runs it on a GPU).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from batchgen.engine import LLM, SamplingParams
from batchgen.engine.graphs import BATCH_BUCKETS, eager_capture
from batchgen.model import AttentionMetadata, Transformer
from reference import random_prompts, reference_greedy, sharp_model, stand_in_graphs


def graph_llm(model: Transformer, **kwargs) -> tuple[LLM, list[Callable]]:
    """An engine whose small decode steps replay from stand-in graphs; also the captured functions."""
    llm = LLM(model=model, device="cpu", **kwargs)
    captured: list[Callable] = []

    def capture(fn: Callable[[], torch.Tensor]):
        captured.append(fn)
        return eager_capture(fn)

    stand_in_graphs(llm, capture)
    return llm, captured


@pytest.mark.parametrize("n_kv_heads", [8, 2])  # MHA and GQA
def test_replayed_decode_steps_give_the_reference_tokens(n_kv_heads: int) -> None:
    model = sharp_model(n_layers=3, n_heads=8, n_kv_heads=n_kv_heads)
    steps: list[AttentionMetadata] = []
    model.register_forward_pre_hook(lambda mod, args: steps.append(args[2]))
    prompts = random_prompts(12, seed=7, lo=1, hi=10)
    max_tokens = [3, 17, 1, 25, 9, 30, 2, 12, 20, 5, 40, 11]
    # 10 slots: the first decode steps have more rows than any bucket and run eagerly; as rows
    # finish the batch falls through every bucket. Blocks of 4 tokens make the tables widen.
    llm, captured = graph_llm(model, max_num_seqs=10, block_size=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)

    graphs = llm.runner.graphs.graphs
    assert len(captured) == len(graphs)  # one recording per (bucket, width), replayed after that
    assert {bucket for bucket, _ in graphs} == set(BATCH_BUCKETS)
    assert len({width for _, width in graphs}) >= 3
    replayed = [s for s in steps if not s.is_prefill and s.block_owner is None]
    eager_decode = [s for s in steps if not s.is_prefill and s.block_owner is not None]
    assert len(replayed) > 3 * len(graphs) and eager_decode, (len(replayed), len(eager_decode))
    for layer in model.layers:  # padding rows wrote into the null block; it is zero again
        assert not layer.attention.k_cache[0].any() and not layer.attention.v_cache[0].any()
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_replayed_steps_sample_and_report_logprobs_like_eager_ones() -> None:
    """Seeded sampling and logprobs read the replayed logits exactly as they read eager ones."""
    model = sharp_model()
    prompts = random_prompts(5, seed=3, lo=2, hi=20)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, logprobs=True, ignore_eos=True)
    eager = LLM(model=model, device="cpu", max_num_seqs=5).generate(prompts, params)
    llm, _ = graph_llm(model, max_num_seqs=5)
    replayed = llm.generate(prompts, params)
    for a, b in zip(eager, replayed):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_cuda_graphs_need_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs one CUDA device"):
        LLM(model=sharp_model(), device="cpu", cuda_graphs=True)
