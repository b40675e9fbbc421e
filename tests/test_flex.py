"""The FlexAttention backend (``batchgen.engine.flex``), checked on the CPU.

FlexAttention compiles through ``torch.compile``, once per shape (8-50 s each on a CPU), so every
test here uses the same shapes: a pool of ``BLOCKS`` blocks of 4 tokens, head dim 16, 4 query
heads, at most 4 rows (batch buckets 1, 2, 4). The kernels compiled for one test serve the next
(and inductor's disk cache serves later runs).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from batchgen.engine import LLM, SamplingParams
from batchgen.engine.attention import AttentionMetadata, PagedAttention
from batchgen.engine.flex import FlexBackend, FlexPagedAttention
from batchgen.engine.graphs import eager_capture
from batchgen.engine.kv_cache import KVCache
from batchgen.model import Transformer
from reference import random_prompts, reference_greedy, sharp_model, stand_in_graphs

D = 16
BLOCKS = 16  # every engine's pool: 16 blocks of 4 tokens (+ the null block)
ROWS = 4


def _record_steps(model: Transformer) -> list:
    """The attention backend of every forward."""
    seen: list = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
    return seen


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA (4 query heads)
def test_flex_attention_matches_sdpa_and_the_in_place_decode(n_kv_heads: int) -> None:
    """fp32, within 1e-5: prefill of new tokens after a cached prefix against SDPA over the whole
    sequences, then a decode step against ``decode_in_place``, on a shuffled pool."""
    torch.manual_seed(0)
    Hq, bs, N = 4, 4, BLOCKS
    G = Hq // n_kv_heads
    cache = KVCache([torch.zeros(1 + N, n_kv_heads, bs, D)], [torch.zeros(1 + N, n_kv_heads, bs, D)])
    backend = FlexBackend(cache, max_model_len=128, max_rows=ROWS)
    lens, new = [9, 14, 6], [3, 14, 1]  # cached prefixes of 6, 0 and 5 tokens
    ids = (torch.randperm(N) + 1).tolist()
    tables = [ids[0:3], ids[3:7], ids[7:9]]
    q = [torch.randn(n, Hq, D) for n in lens]
    k = [torch.randn(n, n_kv_heads, D) for n in lens]
    v = [torch.randn(n, n_kv_heads, D) for n in lens]
    for t, kk, vv, n, m in zip(tables, k, v, lens, new):
        for p in range(n - m):  # the prefix is in the cache already
            cache.k[0][t[p // bs], :, p % bs], cache.v[0][t[p // bs], :, p % bs] = kk[p], vv[p]
    slots = [t[p // bs] * bs + p % bs for t, n, m in zip(tables, lens, new) for p in range(n - m, n)]
    cu = [0, 3, 17, 18]
    metadata = AttentionMetadata(is_prefill=True, cu_seqlens=cu, slot_mapping=torch.tensor(slots))
    tail = [lambda x, n=n, m=m: x[n - m:] for n, m in zip(lens, new)]
    out = backend.step(cache, metadata, tables, lens)(
        0, *(torch.cat([f(x) for f, x in zip(tail, xs)]) for xs in (q, k, v)))
    want = [F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                           is_causal=True, enable_gqa=G > 1).transpose(0, 1)[n - m:]
            for qq, kk, vv, n, m in zip(q, k, v, lens, new)]
    torch.testing.assert_close(out, torch.cat(want), atol=1e-5, rtol=0)

    # Decode one more token of each: the tables padded with the null block, one row's context
    # exactly filling its last block.
    tables[2].append(ids[9])
    W = 4
    padded = torch.tensor([t + [0] * (W - len(t)) for t in tables])
    ctx = torch.tensor([n + 1 for n in lens])
    slots_d = torch.tensor([t[n // bs] * bs + n % bs for t, n in zip(tables, lens)])
    qd, kd, vd = torch.randn(3, Hq, D), torch.randn(3, n_kv_heads, D), torch.randn(3, n_kv_heads, D)
    flex = backend.step(cache, AttentionMetadata(is_prefill=False, slot_mapping=slots_d, block_tables=padded,
                                                 context_lens=ctx))(0, qd, kd, vd)
    owner = torch.zeros(1 + max(max(t) for t in tables), dtype=torch.long)
    for row, t in enumerate(tables):
        owner[t] = row
    in_place = PagedAttention(cache, AttentionMetadata(is_prefill=False, block_tables=padded, context_lens=ctx,
                                                       block_owner=owner))(0, qd, kd, vd)
    torch.testing.assert_close(flex, in_place, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
def test_flex_engine_gives_the_reference_tokens_through_preemption_and_compaction(n_kv_heads: int) -> None:
    """Mixed prompt lengths and outputs, mixed prefill+decode steps, a cache so small that
    requests are preempted and re-prefilled, and blocks renumbered by compaction."""
    model = sharp_model(n_layers=2, n_heads=4, n_kv_heads=n_kv_heads)
    steps = _record_steps(model)
    prompts = random_prompts(5, seed=5, lo=5, hi=20) + random_prompts(3, seed=6, lo=1, hi=4)
    max_tokens = [30, 2, 25, 3, 28, 2, 12, 20]  # (shorter outputs leave no holes to compact)
    # Four rows of up to 50 tokens in 16 blocks of 4: requests are preempted.
    llm = LLM(model=model, device="cpu", block_size=4, num_kv_blocks=BLOCKS, max_num_seqs=ROWS,
              attention_backend="flex")
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)
    assert all(isinstance(s, FlexPagedAttention) for s in steps)
    assert llm.scheduler.num_preemptions > 0
    assert any(s.moves is not None for s in steps), "no compaction ran"
    assert any(s.num_seqs and s.num_decode for s in steps), "no mixed step ran"
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_flex_engine_continues_cached_prefixes_with_the_reference_tokens() -> None:
    """Prefix caching under flex: prefills that continue cached blocks (``ctx_cu_seqlens``),
    packed after the step's uncached ones although admitted before them."""
    model = sharp_model(n_layers=2, n_heads=4, n_kv_heads=2)
    steps = _record_steps(model)
    prefix = random_prompts(1, seed=8, lo=9, hi=10)[0]  # two full blocks of 4, and one token
    a, b, other = prefix + [5, 6], prefix + [7, 8, 9], random_prompts(1, seed=9, lo=6, hi=7)[0]
    llm = LLM(model=model, device="cpu", block_size=4, num_kv_blocks=BLOCKS, max_num_seqs=ROWS,
              attention_backend="flex")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = {}
    llm.add_request(a, params, "a")
    for o in llm.step():
        outs[o.request_id] = o
    llm.add_request(b, params, "b")  # continues a's cached blocks ...
    llm.add_request(other, params, "other")  # ... packed after this one's tokens
    while llm.has_unfinished():
        for o in llm.step():
            outs[o.request_id] = o
    for rid, p in (("a", a), ("b", b), ("other", other)):
        assert outs[rid].token_ids == reference_greedy(model, p, 6), rid
    mixed = [s for s in steps if s.num_seqs == 2]
    assert mixed and mixed[0].metadata.ctx_starts == [8] and mixed[0].metadata.cu_seqlens == [0, len(other)]
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_flex_replayed_decode_at_every_batch_bucket_gives_the_reference_tokens() -> None:
    """Decode steps replayed through the graph stand-in (the contract of a CUDA graph: static
    inputs, the same function run again) at every bucket's padded shape, one graph per bucket
    (the block mask's width is fixed), with no gather cap."""
    model = sharp_model(n_layers=2, n_heads=4, n_kv_heads=2)
    steps = _record_steps(model)
    prompts = random_prompts(7, seed=7, lo=1, hi=10)
    max_tokens = [3, 17, 1, 25, 9, 30, 12]
    llm = LLM(model=model, device="cpu", max_num_seqs=ROWS, block_size=4, num_kv_blocks=BLOCKS,
              attention_backend="flex")
    captured: list[Callable] = []

    def capture(fn: Callable[[], torch.Tensor]):
        captured.append(fn)
        return eager_capture(fn)

    # A cap of one block would send every step of the default backend to eager; flex ignores it.
    graphs = stand_in_graphs(llm, capture, max_gather_bytes=1, flex=llm.runner.flex)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)
    assert set(graphs.graphs) == {(b, graphs.max_blocks) for b in (1, 2, 4)}
    assert len(captured) == 3
    replayed = [s for s in steps if not s.metadata.is_prefill and s.metadata.block_owner is None]
    assert {s.metadata.block_tables.shape[0] for s in replayed} == {1, 2, 4}
    # Every decode-only step replayed, but those that first moved blocks (compaction runs eagerly).
    assert all(s.metadata.is_prefill or s.metadata.block_owner is None or s.moves is not None for s in steps)
    for k_cache, v_cache in zip(llm.kv_cache.k, llm.kv_cache.v):  # padding rows wrote there
        assert not k_cache[0].any() and not v_cache[0].any()


def test_the_attention_backend_option_is_checked() -> None:
    with pytest.raises(ValueError, match="attention_backend must be one of default, flex"):
        LLM(model=sharp_model(), device="cpu", attention_backend="paged")
    assert LLM(model=sharp_model(), device="cpu").runner.flex is None


def test_flex_engine_scores_multi_token_choices_like_the_default_backend(model_dir) -> None:
    """Flex masks know no branches: each multi-token choice gets a plain child of its own there,
    and the scores equal the default backend's (which puts the choices side by side)."""
    from batchgen.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = sharp_model(vocab_size=tok.vocab_size)
    prompts = ["sort: 5 1 3 =", "12+4=", "reverse: cat dog ="]
    params = SamplingParams(choices=["1 3 5", "16", "dog cat 7"])
    want = LLM(model=model, tokenizer=tok, device="cpu", block_size=4, num_kv_blocks=BLOCKS,
               max_num_seqs=ROWS).generate(prompts, params)
    flex = LLM(model=model, tokenizer=tok, device="cpu", block_size=4, num_kv_blocks=BLOCKS, max_num_seqs=ROWS,
               attention_backend="flex")
    got = flex.generate(prompts, params)
    for g, w in zip(got, want):
        assert g.label == w.label and g.label_logprobs == pytest.approx(w.label_logprobs, abs=1e-4)
    # Aborting a row after its prefill drops its children, and every block comes back.
    rid = flex.add_request("12+4=", SamplingParams(choices=["57 1 2 3", "58 9 9"]))
    assert len(tok.encode("12+4=", bos=True)) % 4  # a partial last block: copied per child
    flex.step()
    assert len(flex.scheduler.ready) == 2 and len(flex.blocks.pending_copies) == 2
    flex.abort([rid])
    assert not flex.has_unfinished()
    assert flex.blocks.num_free == flex.blocks.num_blocks and not any(flex.blocks.refs)
