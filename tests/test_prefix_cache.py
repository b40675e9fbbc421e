"""Prefix caching: shared, content-addressed KV blocks give exactly the tokens of a cold cache."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from batchgen.engine import LLM, SamplingParams
from batchgen.engine.kv_cache import BlockManager, bytes_per_block
from batchgen.engine.request import Request
from batchgen.model import Transformer
from reference import reference_greedy, sharp_model, stand_in_graphs

BS = 8  # block size of every engine here: short prompts still span several blocks


@pytest.fixture(scope="module")
def model() -> Transformer:
    return sharp_model(n_layers=2, n_heads=4, n_kv_heads=2, seed=3, max_seq_len=128)


def templated_prompts(n: int = 9, prefix_len: int = 29, seed: int = 5) -> list[list[int]]:
    """``n`` prompts sharing a ``prefix_len``-token prefix, then 1-12 tokens of their own; one
    prompt repeats an earlier one exactly and one is exactly 4 full blocks long (all cached:
    its last token must still be computed)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 300, (prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 300, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    prompts.append(list(prompts[1]))
    prompts.append(prefix[:4 * BS] if prefix_len >= 4 * BS else (prefix + [7] * 4 * BS)[:4 * BS])
    prompts.append(list(prompts[-1]))
    return prompts


def greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run(model: Transformer, prompts: list[list[int]], params, caching: bool, llm_hook: Optional[Callable] = None,
        **engine) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=model, device="cpu", block_size=BS, prefix_caching=caching, **engine)
    if llm_hook is not None:
        llm_hook(llm)
    outs = llm.generate(prompts, params)
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs], llm


def kv_bytes(model: Transformer, blocks: int) -> int:
    return blocks * bytes_per_block(model, BS, torch.float32)


# ---------------------------------------------------------------------------------------------
# The engine: caching on == caching off
# ---------------------------------------------------------------------------------------------


def test_shared_prefix_is_prefilled_once_and_tokens_equal_a_cold_cache(model: Transformer) -> None:
    prompts = templated_prompts()
    cold, cold_llm = run(model, prompts, greedy(), caching=False, max_num_seqs=3)
    warm, llm = run(model, prompts, greedy(), caching=True, max_num_seqs=3)
    assert warm == cold
    for p, toks in list(zip(prompts, warm))[:3]:
        assert toks == reference_greedy(model, p, 10)
    s = llm.scheduler
    assert s.num_prefill_tokens_submitted == sum(map(len, prompts))
    # Rows admitted after the first step find the prefix's 3 full blocks (24 tokens) cached.
    assert s.num_prefill_tokens_computed <= s.num_prefill_tokens_submitted - 6 * 3 * BS
    assert cold_llm.scheduler.num_prefill_tokens_computed == cold_llm.scheduler.num_prefill_tokens_submitted
    assert llm.blocks.num_cached_blocks > 0  # kept after every request finished


def test_one_token_prefills_packed_out_of_request_order_get_their_own_logits(model: Transformer) -> None:
    """A step of sequences with one new token each, where the packing (nothing cached first) is
    not the request order: every token is a logits row, but each request must still get its own."""
    prompt = torch.randint(3, 300, (2 * BS + 1,), generator=torch.Generator().manual_seed(9)).tolist()
    llm = LLM(model=model, device="cpu", block_size=BS)
    llm.generate([prompt], greedy(1))  # caches the prompt's 2 full blocks: a rerun computes 1 token
    first = llm.generate([prompt, [17]], greedy(6))  # cached one first, then a 1-token prompt
    alone = [LLM(model=model, device="cpu", block_size=BS).generate([p], greedy(6))[0] for p in (prompt, [17])]
    assert [o.token_ids for o in first] == [o.token_ids for o in alone]


def test_seeded_sampling_with_caching_equals_without(model: Transformer) -> None:
    prompts = templated_prompts(seed=8)
    params = [SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=40 + i, ignore_eos=True, logprobs=True)
              for i in range(len(prompts))]
    cold = LLM(model=model, device="cpu", block_size=BS, prefix_caching=False, max_num_seqs=4).generate(prompts, params)
    warm = LLM(model=model, device="cpu", block_size=BS, max_num_seqs=4).generate(prompts, params)
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    for w, c in zip(warm, cold):
        assert w.logprobs == pytest.approx(c.logprobs, abs=1e-4)


def test_preemption_under_a_small_cache_keeps_tokens_exact(model: Transformer) -> None:
    prompts = templated_prompts(seed=9)
    params = greedy(24)
    cold, _ = run(model, prompts, params, caching=False, max_num_seqs=12)
    # 20 blocks for up to 12 rows of up to 8 blocks each: decode runs out and preempts.
    warm, llm = run(model, prompts, params, caching=True, max_num_seqs=12, kv_cache_bytes=kv_bytes(model, 20))
    assert llm.scheduler.num_preemptions > 0, "the small cache was meant to force preemption"
    assert warm == cold


def test_eviction_under_a_tiny_cache_keeps_tokens_exact(model: Transformer) -> None:
    # Two prefix families alternate, and 8 blocks cannot keep both: cached blocks are evicted.
    a, b = templated_prompts(n=4, seed=1), templated_prompts(n=4, seed=2)
    prompts = [p for pair in zip(a, b) for p in pair]
    cold, _ = run(model, prompts, greedy(6), caching=False, max_num_seqs=1)
    evicted = []

    def count_evictions(llm: LLM) -> None:
        take = llm.blocks._take

        def counting() -> int:
            evicted.append(not llm.blocks.free)
            return take()

        llm.blocks._take = counting

    warm, llm = run(model, prompts, greedy(6), caching=True, llm_hook=count_evictions, max_num_seqs=1,
                    kv_cache_bytes=kv_bytes(model, 8))
    assert any(evicted), "the tiny cache was meant to force eviction"
    assert warm == cold
    assert llm.blocks.num_free == llm.blocks.num_blocks  # every block back (free or evictable)


def test_compaction_moves_shared_blocks_and_the_index_follows(model: Transformer) -> None:
    # Long and short rows interleaved: finished short rows leave holes under long ones.
    prompts = templated_prompts(n=14, seed=4)
    params = [greedy(40 if i % 4 == 0 else 2) for i in range(len(prompts))]
    cold, _ = run(model, prompts, params, caching=False, max_num_seqs=6)
    moves: list[list[tuple[int, int]]] = []

    def record(llm: LLM) -> None:
        compact = llm.blocks.compact

        def recording(reqs):
            m = compact(reqs)
            if m:
                moves.append(m)
                check_index(llm.blocks, reqs)
            return m

        llm.blocks.compact = recording

    warm, llm = run(model, prompts, params, caching=True, llm_hook=record, max_num_seqs=6)
    assert moves, "the workload was meant to trigger compaction"
    assert warm == cold


def check_index(blocks: BlockManager, reqs: list[Request]) -> None:
    """The prefix index, reference counts and free lists agree with the tables."""
    held: dict[int, int] = {}
    for r in reqs:
        for b in r.block_table:
            held[b] = held.get(b, 0) + 1
        # Each request's registered blocks are where its hashes say.
        for h, b in zip(r.block_hashes, r.block_table):
            if blocks.cached.get(h) is not None and b in blocks.hash_of:
                assert blocks.hash_of[b] == h
    for b in range(1, blocks.num_blocks + 1):
        assert blocks.refs[b] == held.get(b, 0), f"block {b}"
    assert set(blocks.free).isdisjoint(held) and set(blocks.evictable).isdisjoint(held)
    assert {b: h for h, b in blocks.cached.items()} == blocks.hash_of
    assert len(blocks.free) + len(blocks.evictable) + len(held) == blocks.num_blocks


def test_replayed_decode_steps_with_shared_blocks_give_the_same_tokens(model: Transformer) -> None:
    prompts = templated_prompts(seed=6)
    cold, _ = run(model, prompts, greedy(12), caching=False, max_num_seqs=4)
    warm, _ = run(model, prompts, greedy(12), caching=True, llm_hook=stand_in_graphs, max_num_seqs=4)
    assert warm == cold


# ---------------------------------------------------------------------------------------------
# The block manager
# ---------------------------------------------------------------------------------------------


def _req(rid: str, tokens: list[int], adapter_id: Optional[str] = None) -> Request:
    return Request(rid, tokens, greedy(), 256, torch.device("cpu"), adapter_id=adapter_id)


def _prefilled(blocks: BlockManager, req: Request) -> Request:
    """Allocate ``req`` and mark its prompt as computed (what a prefill step does)."""
    blocks.allocate(req)
    req.num_cached = len(req)
    blocks.commit(req)
    return req


def test_same_prefix_under_another_adapter_never_shares_blocks() -> None:
    blocks = BlockManager(32, 4, prefix_caching=True)
    tokens = list(range(3, 20))
    base = _prefilled(blocks, _req("a", tokens))
    for adapter in ("lora-x", "lora-y"):
        other = _prefilled(blocks, _req(adapter, tokens, adapter_id=adapter))
        assert other.block_table[0] not in base.block_table
        assert not set(other.block_table) & set(base.block_table)
    again = _prefilled(blocks, _req("b", tokens))
    assert again.block_table[:4] == base.block_table[:4]  # same adapter (none): shared
    again2 = _prefilled(blocks, _req("c", tokens, adapter_id="lora-x"))
    assert again2.block_table[:4] != base.block_table[:4]


def test_blocks_are_reference_counted_and_evicted_least_recently_used_first() -> None:
    blocks = BlockManager(6, 4, prefix_caching=True)
    a = _prefilled(blocks, _req("a", list(range(3, 12))))  # 2 full blocks + 1 token: [1, 2, 3]
    b = _req("b", list(range(3, 12)))
    blocks.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] == [1, 2] and b.num_cached == 8
    assert [blocks.refs[x] for x in (1, 2, 3)] == [2, 2, 1]
    b.num_cached = len(b)
    blocks.commit(b)
    blocks.release(a)
    assert [blocks.refs[x] for x in (1, 2)] == [1, 1] and 3 in blocks.free  # a's partial block
    blocks.release(b)
    # Unreferenced but still cached: evictable (tail first), counted as free.
    assert list(blocks.evictable) == [2, 1] and blocks.num_free == 6
    c = _prefilled(blocks, _req("c", [50 + i for i in range(9)]))  # never-cached blocks first
    assert c.block_table == [3, 4, 5]
    blocks.release(c)
    assert list(blocks.evictable) == [2, 1, 4, 3]
    # 3 blocks: the free ones (c's partial 5, then 6), then the least recently released cached one (2).
    d = _prefilled(blocks, _req("d", [90 + i for i in range(12)]))
    assert d.block_table == [5, 6, 2]
    assert blocks.lookup(_req("a2", list(range(3, 12)))) == [1]  # a's second block is gone
    assert blocks.lookup(_req("c2", [50 + i for i in range(9)])) == [3, 4]  # c's is still there
    # share/release_blocks: another holder (a fork) keeps blocks alive past their request.
    blocks.share(d.block_table)
    blocks.release(d)
    assert [blocks.refs[x] for x in (5, 6, 2)] == [1, 1, 1] and 6 not in blocks.free
    blocks.release_blocks([5, 6, 2])
    assert blocks.num_free == 6


def test_the_index_survives_compaction() -> None:
    blocks = BlockManager(40, 4, prefix_caching=True)
    long_ = _prefilled(blocks, _req("long", list(range(100, 121))))
    shorts = [_prefilled(blocks, _req(f"s{i}", list(range(3, 12)) + [200 + i])) for i in range(6)]
    tail = [_prefilled(blocks, _req(f"t{i}", list(range(3, 12)) + [300 + i] * 6)) for i in range(3)]
    for r in shorts:
        blocks.release(r)
    for r in [long_]:
        blocks.release(r)
    running = tail
    moves = blocks.compact(running)
    assert moves, "holes below the tail's blocks were meant to trigger compaction"
    check_index(blocks, running)
    # Every tail request shares the same first two blocks, moved once and updated in all tables.
    assert len({tuple(r.block_table[:2]) for r in running}) == 1
    assert max(b for r in running for b in r.block_table) <= len({b for r in running for b in r.block_table})
    # A new request with the same prefix still finds it, at the blocks' new ids.
    again = _req("again", list(range(3, 12)) + [300] * 6)
    blocks.allocate(again)
    assert again.block_table[:3] == tail[0].block_table[:3] and again.num_cached == 12


def test_templated_bench_reports_the_prefix_cache_and_equal_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from batchgen.bench import main

    assert main(["--quick", "--json", "--skip-hf", "--workload", "templated", "--prompts", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    pc = r["prefix_cache"]
    assert r["workload"]["kind"] == "templated" and pc["tokens_equal"]
    assert pc["prefill_tokens_submitted"] == pc["no_cache_prefill_tokens_computed"] == r["workload"]["prompt_tokens"]
    # The 48-token prefix holds 3 full blocks of 16: 7 of 8 rows find them cached.
    assert pc["prefill_tokens_computed"] <= pc["prefill_tokens_submitted"] - 7 * 48
