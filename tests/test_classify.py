"""Classification through the engine: choice log-probabilities against transformers by the definition.

Definition (README "Classification"): a choice's ids are the tokenizer's encoding of the choice
without BOS, appended to the prompt's ids; its log-probability is the sum of its tokens'
log-probabilities. The reference here runs transformers on the whole prompt + choice sequence
for every choice (what the engine must not do) in fp32.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from batchgen.demo import task
from batchgen.engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu")


def reference_scores(hf, tok, prompt: str, choices: list[str], normalize: str = "none") -> list[float]:
    """Each choice's score by the definition, one full transformers forward per choice."""
    p = tok.encode(prompt, bos=True)
    out = []
    for c in choices:
        ids = tok.encode(c, bos=False)
        with torch.no_grad():
            logits = hf(torch.tensor([p + ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        total = sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(ids))
        out.append(total / len(ids) if normalize == "tokens" else total)
    return out


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [task.random_prompt(rng) for _ in range(n)]


def check(out, ref: list[float], choices: list[str]) -> None:
    assert out.finish_reason == "stop" and out.error is None and out.text is None
    assert out.label_logprobs == pytest.approx(ref, abs=1e-4)
    expect = torch.softmax(torch.tensor(ref, dtype=torch.float64), 0).tolist()
    assert out.label_probs == pytest.approx(expect, abs=1e-4)
    assert math.isclose(sum(out.label_probs), 1.0, abs_tol=1e-9)
    assert out.label == choices[max(range(len(ref)), key=lambda j: ref[j])]


def count_tokens(llm: LLM) -> list[int]:
    """Tokens the model runs per forward call, recorded by a forward pre-hook."""
    seen: list[int] = []
    llm.model.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].numel())))
    return seen


def test_single_token_choices_need_only_the_prefill(llm: LLM, hf) -> None:
    choices = ["cat", "dog", "sun"]
    assert all(len(llm.tokenizer.encode(c, bos=False)) == 1 for c in choices)
    ps = prompts(5, seed=1)
    llm2 = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu")
    seen = count_tokens(llm2)
    outs = llm2.generate(ps, SamplingParams(choices=choices))
    # One prefill step, of the prompts alone: the prompt's last logits are the whole answer.
    assert seen == [sum(len(llm.tokenizer.encode(p, bos=True)) for p in ps)]
    for p, o in zip(ps, outs):
        check(o, reference_scores(hf, llm.tokenizer, p, choices), choices)
        assert o.token_ids == []


@pytest.mark.parametrize("normalize", ["none", "tokens"])
def test_multi_token_choices_score_against_the_prompt_kv(llm: LLM, hf, normalize: str) -> None:
    choices = ["87", "7 8 9", "sun cat frog dog", "cat"]
    lens = [len(llm.tokenizer.encode(c, bos=False)) for c in choices]
    assert max(lens) > 3 and min(lens) == 1
    ps = prompts(4, seed=2)
    # Without prefix caching the count is exact (with it, prompts sharing "sort: " compute less).
    small = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=200,
                prefix_caching=False)
    seen = count_tokens(small)
    outs = small.generate(ps, SamplingParams(choices=choices, normalize=normalize))
    # The prompts run once; each multi-token choice adds its tokens but the last, never the prompt again.
    prompt_tokens = sum(len(llm.tokenizer.encode(p, bos=True)) for p in ps)
    assert sum(seen) == prompt_tokens + len(ps) * sum(n - 1 for n in lens)
    for p, o in zip(ps, outs):
        check(o, reference_scores(hf, llm.tokenizer, p, choices, normalize), choices)
    # Every block (shared ones included) went back to the pool.
    assert small.blocks.num_free == small.blocks.num_blocks and not any(small.blocks.refs)
    # With prefix caching (the default) forks share cached blocks too: same scores (within the
    # fp32 tolerance against transformers: cached prefixes take another attention path), fewer tokens.
    cached = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=200)
    seen_cached = count_tokens(cached)
    again = cached.generate(ps, SamplingParams(choices=choices, normalize=normalize))
    assert sum(seen_cached) < sum(seen) and cached.blocks.num_cached_blocks > 0
    for o, o2 in zip(outs, again):
        assert o2.label == o.label and o2.label_logprobs == pytest.approx(o.label_logprobs, abs=1e-4)
    assert cached.blocks.num_free == cached.blocks.num_blocks and not any(cached.blocks.refs)


def test_per_row_choices_mixed_with_generation_under_preemption(llm: LLM, hf) -> None:
    ps = prompts(10, seed=3)
    rows = []
    for i, p in enumerate(ps):
        if i % 3 == 2:  # a generation row in the same batches, long enough to need more blocks
            rows.append(SamplingParams(max_tokens=24, ignore_eos=True))
        else:
            ans = task.answer(p)
            rows.append(SamplingParams(choices=[ans, ans[::-1] + " 1", "sun cat frog dog"][: 2 + i % 2],
                                       normalize="tokens" if i % 2 else "none"))
    # A KV cache this small preempts generation rows.
    small = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=16, max_num_seqs=6)
    outs = small.generate(ps, rows)
    assert small.scheduler.num_preemptions > 0
    alone = llm.generate([p for p, r in zip(ps, rows) if r.choices is None], SamplingParams(max_tokens=24, ignore_eos=True))
    gen = iter(alone)
    for p, r, o in zip(ps, rows, outs):
        if r.choices is None:
            assert o.token_ids == next(gen).token_ids and o.label is None
        else:
            check(o, reference_scores(hf, llm.tokenizer, p, r.choices, r.normalize), r.choices)
    assert small.blocks.num_free == small.blocks.num_blocks and not any(small.blocks.refs)


def test_every_choice_of_a_row_is_scored_in_its_prefill(llm: LLM, hf) -> None:
    """However long the choices, a row costs one step: its choices' tokens are prefilled with its
    prompt, side by side as branches, not fed one per decode step nor in a step of their own."""
    choices = ["1 2 3 4 5 6 7", "7 6 5 4 3 2 1", "sun cat frog dog", "9"]
    ps = prompts(3, seed=5)
    e = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=200,
            prefix_caching=False)
    seen = count_tokens(e)
    outs = e.generate(ps, SamplingParams(choices=choices))
    lens = [len(llm.tokenizer.encode(c, bos=False)) for c in choices]
    assert max(lens) >= 7
    assert seen == [sum(len(llm.tokenizer.encode(p, bos=True)) for p in ps) + len(ps) * sum(n - 1 for n in lens)]
    for p, o in zip(ps, outs):
        check(o, reference_scores(hf, llm.tokenizer, p, choices), choices)
        assert o.token_ids == []


def test_a_step_packs_a_rows_prompt_as_a_prefill_and_its_branches_as_its_continuation(llm: LLM) -> None:
    """What the runner builds for a classification row beside a generation row: the prompts first
    (one causal batch), then the row's branches, each positioned right after its prompt and
    masked from the others; the row asks for the logits at its prompt's last token and at every
    branch token, the generation row at its last token."""
    e = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=64,
            prefix_caching=False)
    choices = ["1 3 5", "cat", "5 3 1 1"]
    lens = [len(llm.tokenizer.encode(c, bos=False)) for c in choices]
    assert lens[1] == 1 and min(lens[0], lens[2]) > 1
    e.add_request("sort: 5 1 3 =", SamplingParams(choices=choices))
    e.add_request("12+4=", SamplingParams(max_tokens=2))
    decode, prefill = e.scheduler.schedule()
    row, gen = prefill
    P, G = row.num_prompt_tokens, len(gen)
    B = len(row) - P
    assert B == (lens[0] - 1) + (lens[2] - 1) and row.num_logit_rows == 1 + B
    ids, positions, md, rows = e.runner.prepare(decode, prefill, [])
    assert md.cu_seqlens == [0, P, P + G] and md.ctx_starts == [P] and md.ctx_cu_seqlens == [0, B]
    first, second = [P] * (lens[0] - 1), [P + lens[0] - 1] * (lens[2] - 1)
    assert md.ctx_branch_starts == first + second
    branch_positions = list(range(P, P + lens[0] - 1)) + list(range(P, P + lens[2] - 1))
    assert positions.tolist() == list(range(P)) + list(range(G)) + branch_positions
    assert ids.tolist() == row.token_ids[:P] + gen.token_ids + row.token_ids[P:]
    assert rows == [[P - 1] + list(range(P + G, P + G + B)), [P + G - 1]]


def test_branches_after_a_cached_prompt_prefix_score_the_same(llm: LLM, hf) -> None:
    """Rows whose prompt is partly in the prefix cache prefill the rest of the prompt and their
    branches in one step, both as continuations of the cache; prompts of whole blocks and ones
    ending mid-block alike. Only prompt blocks are indexed for sharing, never branch blocks."""
    e = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=64)
    choices = ["1 2 3", "3 2 1 1", "9"]
    base = "sort: 5 1 3 7 ="
    n = len(llm.tokenizer.encode(base, bos=True))
    check(e.generate([base], SamplingParams(choices=choices))[0], reference_scores(hf, llm.tokenizer, base, choices), choices)
    assert e.blocks.num_cached_blocks == n // 4  # the prompt's full blocks only
    seen = count_tokens(e)
    branch_tokens = sum(len(llm.tokenizer.encode(c, bos=False)) - 1 for c in choices)
    for extra in ("", " 2", " 2 4", " 2 4 6", " 2 4 6 8 1"):
        p = base + extra
        [o] = e.generate([p], SamplingParams(choices=choices))
        check(o, reference_scores(hf, llm.tokenizer, p, choices), choices)
        m = len(llm.tokenizer.encode(p, bos=True))
        cached = m + branch_tokens - seen[-1]  # whole blocks of the prompt read from the cache
        assert cached % 4 == 0 and 0 < cached < m
    assert e.blocks.num_free == e.blocks.num_blocks and not any(e.blocks.refs)


def test_multi_token_choices_run_with_the_rows_adapter(model_dir: Path) -> None:
    """Every choice token is scored with the row's unmerged adapter (its branches too):
    the scores equal those of the same adapter merged into the weights."""
    desc = model_dir.parent / "adapters" / "desc"
    ps = [p for p in prompts(40, seed=6) if task.kind_of(p) == "sort"][:6]
    rows = []
    for p in ps:
        asc = task.answer(p)
        rows.append([asc, " ".join(reversed(asc.split()))])
    unmerged = LLM(model_dir, dtype="float32", device="cpu", adapters={"desc": desc})
    merged = LLM(model_dir, dtype="float32", device="cpu", adapters={"desc": desc}, merge_adapter=True)
    a = unmerged.generate(ps, [SamplingParams(choices=c, adapter="desc") for c in rows])
    b = merged.generate(ps, [SamplingParams(choices=c) for c in rows])
    base = unmerged.generate(ps, [SamplingParams(choices=c) for c in rows])
    for c, x, y, z in zip(rows, a, b, base):
        assert x.label_logprobs == pytest.approx(y.label_logprobs, abs=1e-4)
        assert x.label == c[1] and z.label == c[0]  # the adapter sorts descending, the base ascending


def test_labels_on_the_demo_task(llm: LLM) -> None:
    ps = prompts(30, seed=4)
    rows = []
    for p in ps:
        ans = task.answer(p)
        kind = task.kind_of(p)
        wrong = (str(int(ans) + 1) if kind == "add" else " ".join(reversed(ans.split())) if kind == "reverse"
                 else " ".join(sorted(ans.split(), reverse=True)))
        if wrong == ans:
            wrong = ans + " 0"
        rows.append([wrong, ans])
    outs = llm.generate(ps, [SamplingParams(choices=c) for c in rows])
    right = sum(o.label == task.answer(p) for p, o in zip(ps, outs))
    assert right >= 28, [(p, o.label) for p, o in zip(ps, outs)]
    assert all(o.label_probs[o.label_logprobs.index(max(o.label_logprobs))] >= 0.5 for o in outs)


def test_bad_classification_rows_are_error_rows(llm: LLM) -> None:
    no_tok = LLM(model=llm.model, device="cpu")
    [o] = no_tok.generate([[1, 5, 6]], SamplingParams(choices=["a"]))
    assert o.finish_reason == "error" and "tokenizer" in o.error
    long_prompt = "sort: " + " ".join("1" * 40) + " ="
    [o] = llm.generate([long_prompt], SamplingParams(choices=["1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"]))
    assert o.finish_reason == "error" and "prompt_too_long" in o.error and "choice" in o.error
    # Many choices side by side can outgrow a small KV cache while every one fits the context.
    small = LLM(model=llm.model, tokenizer=llm.tokenizer, device="cpu", block_size=4, num_kv_blocks=8)
    [o] = small.generate(["sort: 4 1 3 2 ="], SamplingParams(choices=[f"{d} {d} {d} {d}" for d in range(1, 8)]))
    assert o.finish_reason == "error" and "prompt_too_long" in o.error, o.error
    assert "its choices' 49 side by side" in o.error and "KV cache (32 tokens)" in o.error, o.error
    with pytest.raises(ValueError, match="exclude"):
        SamplingParams(choices=["a"], constraint=("regex", "a"))
    with pytest.raises(ValueError, match="normalize"):
        SamplingParams(choices=["a"], normalize="mean")


def test_bench_classify_quick_agrees_with_transformers() -> None:
    import argparse

    from batchgen.bench.run import add_bench_args
    from batchgen.bench.tasks import run_tasks

    p = argparse.ArgumentParser()
    add_bench_args(p)
    report = run_tasks(p.parse_args(["--classify", "--quick", "--prompts", "4", "--hf-batch", "2"]))["classify"]
    report = report["prompts_8_24"]
    for name in ("classify_multi_token", "classify_single_token"):
        assert report[name]["max_abs_diff_vs_hf"] < 1e-4
        assert report[name]["engine_rows_per_s"] > 0 and report[name]["hf_rows_per_s"] > 0
    assert report["generate_4_tokens_rows_per_s"] > 0 and report["generate_1_token_rows_per_s"] > 0


def test_block_manager_shares_copies_and_compacts_shared_blocks() -> None:
    from batchgen.engine.kv_cache import BlockManager
    from batchgen.engine.request import Request

    bm = BlockManager(num_blocks=40, block_size=4)

    def req(n: int) -> Request:
        r = Request(str(n), list(range(3, 3 + n)), SamplingParams(max_tokens=4), 128, torch.device("cpu"))
        bm.allocate(r)
        return r

    filler = [req(8) for _ in range(10)]  # blocks 1..20
    parent = req(10)  # blocks 21, 22 full; 23 partial
    t1, t2 = bm.fork(parent, 10), bm.fork(parent, 10)
    assert t1[:2] == t2[:2] == parent.block_table[:2] and t1[2] != t2[2]
    assert bm.pending_copies == [(parent.block_table[2], t1[2]), (parent.block_table[2], t2[2])]
    assert bm.compact([*filler, parent]) == []  # nothing moves while copies are pending
    copies = bm.take_copies()
    bm.release(parent)
    assert 23 not in bm.free  # held for the copies
    bm.copies_done(copies)
    assert 23 in bm.free and bm.refs[21] == 2
    c1, c2 = (Request(f"c{k}", list(range(3, 14)), SamplingParams(max_tokens=2), 128, torch.device("cpu"))
              for k in (1, 2))
    c1.block_table, c2.block_table = t1, t2
    for r in filler:
        bm.release(r)
    moves = bm.compact([c1, c2])
    # A shared block moves once, and every table that holds it follows.
    assert len(moves) == len({s for s, _ in moves}) == 4
    assert c1.block_table[:2] == c2.block_table[:2] and max(c1.block_table + c2.block_table) <= 4
    assert sorted((b, n) for b, n in enumerate(bm.refs) if n) == sorted({**{b: 2 for b in c1.block_table[:2]}, c1.block_table[2]: 1,
                                              c2.block_table[2]: 1}.items())
    bm.release(c1)
    bm.release(c2)
    assert bm.num_free == 40 and not any(bm.refs)


def test_a_crowded_engine_mixing_adapters_choices_and_generation_gives_what_each_row_gives_alone(
        model_dir: Path) -> None:
    """Rows on the base model and on an unmerged adapter, generating (free or under a regex) and
    classifying (single- and multi-token choices, each row's branches beside its prompt), through
    a KV cache small enough to preempt: every row's output equals that row run alone on a roomy
    engine."""
    desc = model_dir.parent / "adapters" / "desc"
    rng = random.Random(7)
    ps = prompts(24, seed=7)
    rows = []
    for i, p in enumerate(ps):
        adapter = "desc" if i % 2 else None
        if i % 3 == 0:
            rows.append(SamplingParams(max_tokens=24, ignore_eos=True, adapter=adapter))
        elif i % 5 == 0:  # structured output in the same steps
            rows.append(SamplingParams(max_tokens=8, constraint=("regex", r"\d \d( \d)*"), adapter=adapter))
        else:
            ans = task.answer(p)
            extra = ["sun cat frog dog", "7 8 9 1 2", "5"][: 1 + rng.randrange(3)]
            rows.append(SamplingParams(choices=[ans, " ".join(reversed(ans.split())), *extra], adapter=adapter))
    crowded = LLM(model_dir, dtype="float32", device="cpu", adapters={"desc": desc}, block_size=4,
                  num_kv_blocks=16, max_num_seqs=6)
    outs = crowded.generate(ps, rows)
    assert crowded.scheduler.num_preemptions > 0
    roomy = LLM(model_dir, dtype="float32", device="cpu", adapters={"desc": desc})
    for p, r, o in zip(ps, rows, outs):
        [alone] = roomy.generate([p], r)
        assert o.finish_reason == alone.finish_reason and o.error is None
        if r.choices is None:
            assert o.token_ids == alone.token_ids
        else:
            assert o.label == alone.label and o.label_logprobs == pytest.approx(alone.label_logprobs, abs=1e-4)
    assert crowded.blocks.num_free == crowded.blocks.num_blocks and not any(crowded.blocks.refs)
