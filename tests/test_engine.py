"""The continuous-batching engine against a cache-free reference loop on the same model."""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from batchgen.engine import LLM, SamplingParams
from batchgen.engine import kv_cache
from batchgen.engine.kv_cache import bytes_per_block, zeroed
from batchgen.engine.attention import AttentionMetadata
from batchgen.model import ModelArgs, Transformer
from batchgen.ops import cpu_matmul, linear, onednn_linear_available
from reference import random_prompts, reference_greedy, reference_logits, sharp_model


def _model(n_kv_heads: int = 2, seed: int = 0, max_seq_len: int = 128) -> Transformer:
    return sharp_model(n_layers=3, n_heads=8, n_kv_heads=n_kv_heads, seed=seed, max_seq_len=max_seq_len)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


def _ops(fn: Callable[[], object]) -> set[str]:
    """Names of the ops ``fn`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN")
def test_cpu_fp32_inference_matmuls_run_through_onednn_and_match_f_linear() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 96, generator=g)
    with torch.inference_mode():
        for rows in (1, 7, 64):
            x = torch.randn(rows, 96, generator=g)
            assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, w))
            torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        # A strided view (the FFN's halves are such views) is read correctly too.
        x = torch.randn(9, 192, generator=g)[:, ::2]
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        # The model's inference forward uses it.
        m = _model()
        assert "mkldnn::_linear_pointwise" in _ops(lambda: m.logits_full(torch.tensor([[1, 2, 3]])))
    # Training keeps the differentiable F.linear, and bf16 PyTorch's own path.
    x = torch.randn(4, 96, generator=g)
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w.requires_grad_()))
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x.bfloat16(), w.detach().bfloat16()))


def test_blas_switch_gives_the_same_tokens() -> None:
    model = _model()
    prompts = random_prompts(6, seed=11)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    fast = [o.token_ids for o in LLM(model=model, device="cpu").generate(prompts, params)]
    with cpu_matmul("blas"):
        with torch.inference_mode():
            x, w = torch.randn(3, 8), torch.randn(5, 8)
            assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w))
        assert [o.token_ids for o in LLM(model=model, device="cpu").generate(prompts, params)] == fast


@pytest.mark.parametrize("n_kv_heads", [8, 2])  # MHA and GQA
def test_continuous_batching_matches_reference(n_kv_heads: int) -> None:
    model = _model(n_kv_heads)
    prompts = random_prompts(10)
    max_tokens = [3, 17, 1, 25, 9, 30, 2, 12, 20, 5]
    # max_num_seqs < number of prompts: slots are refilled as rows finish.
    llm = LLM(model=model, device="cpu", max_num_seqs=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.finish_reason == "length"
        assert o.token_ids == reference_greedy(model, p, m)
        assert o.prompt_token_ids == p


def test_preemption_under_a_small_cache_keeps_tokens_exact(model: Transformer) -> None:
    prompts = random_prompts(8, seed=3, lo=10, hi=30)
    per_block = bytes_per_block(model, 16, torch.float32)
    llm = LLM(model=model, device="cpu", kv_cache_bytes=per_block * 6, max_num_seqs=8)
    assert llm.blocks.num_blocks == 6
    outs = llm.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    assert llm.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference_greedy(model, p, 30)
    assert llm.blocks.num_free == 6  # every block came back


def test_batch_invariance_of_greedy_tokens(model: Transformer) -> None:
    prompts = random_prompts(12, seed=5)
    llm = LLM(model=model, device="cpu")
    batched = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    for p, b in zip(prompts, batched):
        alone = llm.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0]
        assert alone.token_ids == b.token_ids


def test_abort_drops_some_requests_and_the_rest_run_on_exactly(model: Transformer) -> None:
    prompts = random_prompts(6, seed=11)
    llm = LLM(model=model, device="cpu", max_num_seqs=3)  # 3 running, 3 waiting
    ids = [llm.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True), request_id=f"r{i}")
           for i, p in enumerate(prompts)]
    outs = {o.request_id: o for _ in range(3) for o in llm.step()}
    assert llm.num_waiting == 3 and not outs
    llm.abort(["r0", "r4"])  # one running, one waiting
    assert llm.num_waiting == 2
    while llm.has_unfinished():
        outs.update((o.request_id, o) for o in llm.step())
    assert sorted(outs) == [r for r in ids if r not in ("r0", "r4")]
    for i, p in enumerate(prompts):
        if f"r{i}" in outs:
            assert outs[f"r{i}"].token_ids == reference_greedy(model, p, 12)
    assert llm.blocks.num_free == llm.blocks.num_blocks  # the aborted rows' blocks came back


def test_seeded_sampling_does_not_depend_on_batch(model: Transformer) -> None:
    prompts = random_prompts(6, seed=7)
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=11, ignore_eos=True)
    llm = LLM(model=model, device="cpu")
    alone = llm.generate([prompts[0]], sp)[0].token_ids
    others = [SamplingParams(max_tokens=m, temperature=0.8, seed=i) for i, m in enumerate([5, 30, 2, 9, 14])]
    mixed = llm.generate(prompts, [sp] + others)[0].token_ids
    assert alone == mixed
    other_seed = llm.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=1.0, seed=12, ignore_eos=True))
    assert other_seed[0].token_ids != alone
    # Sampling really samples: at temperature 1 it leaves the greedy path.
    assert alone != llm.generate([prompts[0]], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(model: Transformer) -> None:
    prompts = random_prompts(4, seed=9)
    llm = LLM(model=model, device="cpu")
    greedy = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))]
    k1 = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=1, ignore_eos=True))
    p0 = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True))
    assert [o.token_ids for o in k1] == greedy
    assert [o.token_ids for o in p0] == greedy


def test_logprobs_are_the_chosen_tokens_log_softmax(model: Transformer) -> None:
    prompt = random_prompts(1, seed=13)[0]
    llm = LLM(model=model, device="cpu")
    out = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True))[0]
    seq = prompt + out.token_ids
    with torch.inference_mode():
        lp = torch.log_softmax(reference_logits(model, seq), dim=-1)
    expected = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_eos_and_stop_token_ids_finish_with_stop(model: Transformer) -> None:
    prompt = random_prompts(1, seed=15)[0]
    llm = LLM(model=model, device="cpu")
    free = llm.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    stop_tok = free[5]
    first = free.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: first + 1]
    llm.eos_id = stop_tok  # the same token as EOS: stops unless ignore_eos
    assert llm.generate([prompt], SamplingParams(max_tokens=20))[0].token_ids == free[: first + 1]
    assert llm.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids == free


def test_prompt_too_long_is_a_row_error_or_truncated() -> None:
    model = _model(max_seq_len=64)
    llm = LLM(model=model, device="cpu")
    long_prompt = list(range(3, 103))  # 100 tokens > 64
    ok_prompt = [5, 6, 7]
    outs = llm.generate([long_prompt, ok_prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    assert outs[0].finish_reason == "error" and outs[0].error.startswith("prompt_too_long")
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 4
    trunc = llm.generate([long_prompt], SamplingParams(max_tokens=4, ignore_eos=True, truncate_prompt=True))[0]
    assert trunc.finish_reason == "length" and len(trunc.token_ids) == 4
    assert trunc.prompt_token_ids == long_prompt[-60:]
    assert trunc.token_ids == reference_greedy(model, long_prompt[-60:], 4)
    # Generation stops at the context length even when max_tokens asks for more.
    near = llm.generate([list(range(3, 63))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert near.finish_reason == "length" and len(near.token_ids) == 4


def test_bad_prompts_are_row_errors(model: Transformer) -> None:
    llm = LLM(model=model, device="cpu")
    outs = llm.generate([[], [5, 999], "text without a tokenizer", [5, 6]], SamplingParams(max_tokens=2))
    assert [o.finish_reason for o in outs[:3]] == ["error"] * 3
    assert "empty" in outs[0].error and "out of range" in outs[1].error and "tokenizer" in outs[2].error
    assert outs[3].ok


def test_a_model_on_another_device_than_the_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="weights are on meta but the engine runs on cpu"):
        LLM(model=sharp_model().to("meta"), device="cpu")


def test_sampling_params_are_validated() -> None:
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_text_and_stop_strings_with_the_real_tokenizer(shared_dir) -> None:
    from batchgen.tokenizer import Tokenizer

    tok = Tokenizer(shared_dir / "tokenizers" / "llama" / "tokenizer.model")
    torch.manual_seed(3)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32000, multiple_of=16,
                                  max_seq_len=128)).eval()
    llm = LLM(model=model, tokenizer=tok, device="cpu")
    prompts = ["Once upon a time", "Der Bär 🐻 sagt", "日本語のテキスト"]
    free = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    for out in free:
        assert out.text == tok.decode(out.token_ids)
    # A stop string made of the end of one token's text and the start of the next.
    text, ids = free[0].text, free[0].token_ids
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    k = next(k for k in range(5, len(ids)) if len(pieces[k]) - len(pieces[k - 1]) >= 2
             and len(pieces[k + 1]) - len(pieces[k]) >= 2)
    stop = pieces[k + 1][len(pieces[k]) - 1: len(pieces[k]) + 1]
    assert len(stop) == 2
    cut = text.find(stop)
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:cut]
    assert len(out.token_ids) < len(ids)


# --- the fast paths: mixed steps, block compaction, fused projections -----------------------


def _record_steps(model: Transformer) -> list[AttentionMetadata]:
    """The attention metadata of every forward (a forward pre-hook, as tensor parallelism uses)."""
    seen: list[AttentionMetadata] = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[2].metadata))
    return seen


@pytest.mark.parametrize("n_kv_heads", [8, 2])  # MHA and GQA
def test_mixed_prefill_and_decode_steps_match_reference(n_kv_heads: int) -> None:
    model = _model(n_kv_heads=n_kv_heads)
    steps = _record_steps(model)
    prompts = random_prompts(9, seed=3, lo=2, hi=30)
    max_tokens = [4, 20, 2, 15, 9, 1, 12, 7, 18]
    llm = LLM(model=model, device="cpu", max_num_seqs=3)  # finished rows are refilled mid-decode
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)
    assert any(s.is_prefill and s.num_decode > 0 for s in steps), "no mixed step ran"
    lens = [[e - b for b, e in zip(s.cu_seqlens, s.cu_seqlens[1:])] for s in steps if s.is_prefill]
    assert any(len(set(x)) > 1 for x in lens), "no padded prefill of unequal lengths ran"


def test_block_compaction_keeps_tokens_exact() -> None:
    model = _model()
    steps = _record_steps(model)
    # Short requests take the low block ids and finish at once: their blocks become holes
    # below the long requests' blocks, which the long ones refill far slower than that.
    prompts = random_prompts(8, seed=5, lo=20, hi=30) + random_prompts(4, seed=6, lo=20, hi=30)
    max_tokens = [2] * 8 + [40] * 4
    llm = LLM(model=model, device="cpu", block_size=4)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    assert any(s.block_moves is not None for s in steps), "no compaction ran"
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == reference_greedy(model, p, m)
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_fused_projections_match_the_unfused_reference_and_keep_gradients() -> None:
    model = _model(seed=1)
    tokens = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            fused = model.logits_full(tokens)  # one stacked matmul per projection group
            separate = torch.stack([reference_logits(model, row.tolist()) for row in tokens])
        return fused, separate

    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(*both(), **close)
    attn, ffn = model.layers[0].attention, model.layers[1].feed_forward
    with torch.no_grad():
        start, stop = attn.fused_rows()["wk"]
        attn.wqkv.weight[start:stop].mul_(0.5)  # one projection's rows, as a per-projection edit does
        start, stop = ffn.fused_rows()["w3"]
        ffn.w13.weight[start:stop] = torch.randn(stop - start, ffn.w13.weight.shape[1]) * 0.1
    fused, separate = both()
    torch.testing.assert_close(fused, separate, **close)
    with torch.enable_grad():
        model.logits_full(tokens).sum().backward()
    for lin, rows in ((attn.wqkv, attn.fused_rows()), (ffn.w13, ffn.fused_rows())):
        for start, stop in rows.values():  # every projection's rows get a gradient
            assert lin.weight.grad[start:stop].abs().sum() > 0


def _rss_bytes(kind: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(kind + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read RSS")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kv_pool_reads_zero_and_takes_memory_only_where_written(dtype: torch.dtype) -> None:
    # The null block and padded slots must read as zeros; the pool must not be written up front
    # (that was most of building an engine) nor count in RSS before a block is used.
    shape = (1 + 2048, 4, 16, 256)  # 2049 blocks of 32 KiB (fp32): 256 MiB
    before, shared_before = _rss_bytes(), _rss_bytes("RssShmem")
    pool = zeroed(shape, dtype, torch.device("cpu"))
    assert _rss_bytes() - before < 16 << 20
    assert pool.shape == shape and pool.dtype == dtype and pool.is_contiguous()
    assert not pool[0].any() and not pool[-1].any()
    pool[7] = 1.5
    assert float(pool[7].sum()) == 1.5 * pool[7].numel() and not pool[6].any() and not pool[8].any()
    assert _rss_bytes() - before < 16 << 20
    full = pool.numel() * pool.element_size()
    pool.fill_(2.0)  # now every page is real
    assert _rss_bytes() - before > full // 2
    assert _rss_bytes("RssShmem") - shared_before < 16 << 20  # private: a forked child does not share it


@pytest.mark.skipif(kv_cache.host_memory_available() is None, reason="needs Linux /proc/meminfo")
def test_a_cpu_kv_cache_larger_than_the_memory_available_is_refused_up_front(model: Transformer,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool is written lazily, so without this check an oversized one would only fail mid-job.
    assert kv_cache.host_memory_available() > 1 << 20
    llm = LLM(model=model, device="cpu", kv_cache_bytes=8 << 20)  # fits in this machine
    pool = (1 + llm.blocks.num_blocks) * bytes_per_block(model, llm.blocks.block_size, torch.float32)
    monkeypatch.setattr(kv_cache, "host_memory_available", lambda: pool - 1)
    with pytest.raises(ValueError, match=rf"KV cache of {llm.blocks.num_blocks} blocks needs [0-9.]+ GiB, but only "
                                         r"[0-9.]+ GiB of memory is available: lower the KV budget"):
        LLM(model=model, device="cpu", kv_cache_bytes=8 << 20)
    monkeypatch.setattr(kv_cache, "host_memory_available", lambda: pool)
    LLM(model=model, device="cpu", kv_cache_bytes=8 << 20)  # exactly enough


def test_context_length_change_leaves_the_callers_args_alone() -> None:
    """``max_model_len`` replaces the model's args: one ``ModelArgs`` may build many models (the
    bench's presets did, and an engine once shortened every later model built from them)."""
    model = sharp_model(max_seq_len=128)
    args = model.args
    llm = LLM(model=model, device="cpu", max_model_len=40, max_num_seqs=2)
    assert args.max_seq_len == 128 and model.args.max_seq_len == 40 and llm.max_model_len == 40
    prompt = [5, 17, 42, 9]
    out = llm.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(model, prompt, 30)  # RoPE tables rebuilt for 40 positions
    assert Transformer(args).args.max_seq_len == 128
