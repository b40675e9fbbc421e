"""Decode steps replayed from graphs (``batchgen.engine.graphs``), checked on the CPU.

A CUDA graph replays the recorded work on the recorded memory, so a step only works if every
input reaches it through the static buffers. ``eager_capture`` keeps that contract without a
GPU: the same function is run again on every replay and its result lands in the same output
tensor. The only part not run here is the ``torch.cuda.CUDAGraph`` recording itself
(``tests/test_gpu.py`` runs it on a GPU).
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from batchgen.engine import LLM, SamplingParams
from batchgen.engine.attention import batch_buckets
from batchgen.engine.graphs import eager_capture
from batchgen.engine.attention import AttentionMetadata
from batchgen.model import Transformer
from reference import random_prompts, reference_greedy, sharp_model, stand_in_graphs


def graph_llm(model: Transformer, graphs: Optional[dict] = None, **kwargs) -> tuple[LLM, list[Callable]]:
    """An engine whose decode steps replay from stand-in graphs (``graphs``: DecodeGraphs options);
    also the captured functions."""
    llm = LLM(model=model, device="cpu", **kwargs)
    captured: list[Callable] = []

    def capture(fn: Callable[[], torch.Tensor]):
        captured.append(fn)
        return eager_capture(fn)

    stand_in_graphs(llm, capture, **(graphs or {}))
    return llm, captured


def decode_steps(model: Transformer) -> tuple[list[AttentionMetadata], list[AttentionMetadata]]:
    """Lists that fill, as ``model`` runs, with its replayed and its eager decode steps."""
    replayed: list[AttentionMetadata] = []
    eager: list[AttentionMetadata] = []

    def hook(mod: torch.nn.Module, args: tuple) -> None:
        metadata = args[2].metadata
        if not metadata.is_prefill:  # a replayed step gathers: it has no block_owner
            (replayed if metadata.block_owner is None else eager).append(metadata)

    model.register_forward_pre_hook(hook)
    return replayed, eager


def test_batch_buckets_double_up_to_the_engines_batch() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(10) == (1, 2, 4, 8, 10)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)


@pytest.mark.parametrize("n_kv_heads", [8, 2])  # MHA and GQA
def test_replayed_decode_steps_give_the_reference_tokens(n_kv_heads: int) -> None:
    model = sharp_model(n_layers=3, n_heads=8, n_kv_heads=n_kv_heads)
    replayed, eager_decode = decode_steps(model)
    prompts = random_prompts(12, seed=7, lo=1, hi=10)
    max_tokens = [3, 17, 1, 25, 9, 30, 2, 12, 20, 5, 40, 11]
    # 10 slots, graphs up to 8 rows: the first decode steps have more rows than any bucket and
    # run eagerly; as rows finish the batch falls through every bucket. Blocks of 4 tokens make
    # the tables widen.
    llm, captured = graph_llm(model, {"max_rows": 8}, max_num_seqs=10, block_size=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)

    graphs = llm.runner.graphs.graphs
    assert len(captured) == len(graphs)  # one recording per (bucket, width), replayed after that
    assert {bucket for bucket, _ in graphs} == {1, 2, 4, 8}
    assert len({width for _, width in graphs}) >= 3
    assert len(replayed) > 3 * len(graphs) and eager_decode, (len(replayed), len(eager_decode))
    # Padding rows wrote into the null block; it is zero again.
    for k_cache, v_cache in zip(llm.kv_cache.k, llm.kv_cache.v):
        assert not k_cache[0].any() and not v_cache[0].any()
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_decode_steps_whose_gather_is_too_big_run_eagerly() -> None:
    """Past ``max_gather_bytes`` (here 24 blocks of one layer's K) a step runs eagerly, with the
    same tokens; every recorded graph stays within it, and the batch's full bucket replays."""
    model = sharp_model(n_layers=2, n_heads=4, n_kv_heads=2)
    replayed, eager_decode = decode_steps(model)
    prompts = random_prompts(6, seed=5, lo=2, hi=6)
    max_tokens = [30, 8, 25, 3, 40, 16]
    block_bytes = 2 * 4 * 16 * 4  # kv heads x block size x head dim x fp32
    llm, _ = graph_llm(model, {"max_gather_bytes": 24 * block_bytes}, max_num_seqs=6, block_size=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)
    graphs = llm.runner.graphs
    assert all(bucket * width <= 24 for bucket, width in graphs.graphs), sorted(graphs.graphs)
    assert (6, 2) in graphs.graphs  # the first decode steps: all 6 rows, short tables
    assert len(replayed) > 10 and len(eager_decode) > 10
    # Eager: too big a gather, or blocks were moved before the step (compaction).
    assert all(m.block_moves is not None or not graphs.fits(*m.block_tables.shape) for m in eager_decode)
    assert any(m.block_moves is None for m in eager_decode)


def test_compiled_replayed_steps_give_the_reference_tokens() -> None:
    """``compile_decode``: the replayed step through ``torch.compile`` (dynamic shapes), across
    buckets and widths, gives the cache-free reference's tokens; one compiled function serves
    every (bucket, width) pair."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = sharp_model(n_layers=2, n_heads=4, n_kv_heads=2)
    prompts = random_prompts(5, seed=9, lo=1, hi=12)
    max_tokens = [20, 3, 14, 30, 8]
    llm, _ = graph_llm(model, {"compile_decode": True}, max_num_seqs=5, block_size=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)
    graphs = llm.runner.graphs
    assert len({b for b, _ in graphs.graphs}) >= 3 and len({w for _, w in graphs.graphs}) >= 3
    # Batch 1 and width 1 are compiled as special cases; every other pair reuses one compile.
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= compiled <= 4 < len(graphs.graphs), (compiled, sorted(graphs.graphs))


def test_engines_on_the_cpu_run_eagerly_by_default() -> None:
    assert LLM(model=sharp_model(), device="cpu").runner.graphs is None
    assert LLM(model=sharp_model(), device="cpu", compile_decode=True).runner.graphs is None  # nothing replays


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
