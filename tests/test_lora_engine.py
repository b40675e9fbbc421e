"""LoRA adapters through the engine (LLM.generate): unmerged adapters in mixed batches, merged,
tensor-parallel, against transformers + peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from batchgen.engine import LLM, SamplingParams
from test_lora import ALL7, hf_base, peft_model, save_adapter

peft = pytest.importorskip("peft", reason="peft is a test dependency")

# Different lengths, so prefills and decodes of different adapters overlap in steps.
PROMPTS = [[1, 17, 45, 99, 3, 250, 8], [1, 200, 5, 61], [1, 7, 7, 7, 9, 100, 31, 4, 2, 5], [1, 3],
           [1, 99, 98, 97, 96, 95], [1, 42, 43]]
N = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_hf_config: Callable[..., Any]) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("lora-engine")
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(d / "base"))
    a = save_adapter(base, d / "a", targets=ALL7, r=8, alpha=16, seed=1)
    b = save_adapter(base, d / "b", targets=["q_proj", "v_proj"], r=4, alpha=8, rslora=True, safe=False, seed=2)
    return {"dir": d, "base": base, "a": a, "b": b}


def hf_generate(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (EOS allowed, as with ignore_eos) and the logprob of each under ``model``
    (transformers/peft), one full forward per token."""
    toks, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(input_ids=torch.tensor([toks])).logits[0, -1].float(), dim=-1)
            toks.append(int(lp.argmax()))
            lps.append(float(lp[toks[-1]]))
    return toks[len(prompt):], lps


@pytest.fixture(scope="module")
def references(setup: dict[str, Any]) -> dict[str, list[tuple[list[int], list[float]]]]:
    base = setup["base"]
    models = {None: base, "a": peft_model(base, setup["a"]), "b": peft_model(base, setup["b"])}
    return {k: [hf_generate(m, p, N) for p in PROMPTS] for k, m in models.items()}


def params(adapter: str | None) -> SamplingParams:
    return SamplingParams(max_tokens=N, ignore_eos=True, logprobs=True, adapter=adapter)


def check(outs: list, want: list[tuple[list[int], list[float]]]) -> None:
    for o, (toks, lps) in zip(outs, want):
        assert o.finish_reason == "length", o.error
        assert o.token_ids == toks
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(lps), atol=1e-4, rtol=0)


def test_adapters_really_change_the_tokens(references: dict) -> None:
    assert references["a"] != references[None] and references["b"] != references[None]
    assert [t for t, _ in references["a"]] != [t for t, _ in references[None]]


def test_mixed_batch_of_base_and_two_adapters_matches_peft(setup: dict[str, Any], references: dict) -> None:
    llm = LLM(setup["dir"] / "base", dtype="float32", device="cpu", kv_cache_bytes=1 << 22, max_num_seqs=8,
              adapters={"a": setup["a"], "b": setup["b"]})
    assert llm.adapter_names == ["a", "b"]
    # Every prompt three times: base, a, b interleaved, all in the same steps.
    names = [None, "a", "b"]
    prompts = [p for p in PROMPTS for _ in names]
    outs = llm.generate(prompts, [params(n) for _ in PROMPTS for n in names])
    for j, n in enumerate(names):
        check(outs[j::3], references[n])
    # "" is the base model as well; an unknown name becomes an error row naming it.
    bad = llm.generate([PROMPTS[0], PROMPTS[1]], [params(""), params("nope")])
    check(bad[:1], references[None][:1])
    assert bad[1].finish_reason == "error" and "unknown adapter 'nope'" in bad[1].error


def test_add_request_adapter_argument_overrides_params(setup: dict[str, Any], references: dict) -> None:
    llm = LLM(setup["dir"] / "base", dtype="float32", device="cpu", kv_cache_bytes=1 << 22, adapters={"b": setup["b"]})
    rid = llm.add_request(PROMPTS[2], params(None), adapter="b")
    outs = {}
    while llm.has_unfinished():
        outs.update({o.request_id: o for o in llm.step()})
    check([outs[rid]], references["b"][2:3])


def test_merged_adapter_matches_peft(setup: dict[str, Any], references: dict) -> None:
    llm = LLM(setup["dir"] / "base", dtype="float32", device="cpu", kv_cache_bytes=1 << 22,
              adapters={"a": setup["a"]}, merge_adapter=True)
    assert llm.lora is None and llm.adapter_names == ["a"]
    check(llm.generate(PROMPTS, [params(None)] * len(PROMPTS)), references["a"])
    check(llm.generate(PROMPTS[:1], [params("a")]), references["a"][:1])
    assert "unknown adapter 'b'" in llm.generate(PROMPTS[:1], [params("b")])[0].error


def test_tp2_mixed_adapters_equal_peft(setup: dict[str, Any], references: dict) -> None:
    from test_tp import _run_replica

    adapters = {"a": str(setup["a"]), "b": str(setup["b"])}
    names = [None, "a", "b"]
    job = {"name": "lora", "dir": str(setup["dir"] / "base"), "prompts": [p for p in PROMPTS for _ in names],
           "params": [params(n) for _ in PROMPTS for n in names],
           "engine": {"max_num_seqs": 8, "adapters": adapters}, "follower": {"adapters": adapters}}
    merged = {"name": "merged", "dir": str(setup["dir"] / "base"), "prompts": PROMPTS,
              "params": [params(None)] * len(PROMPTS),
              "engine": {"adapters": {"a": str(setup["a"])}, "merge_adapter": True},
              "follower": {"adapters": {"a": str(setup["a"])}, "merge_adapter": True}}
    got = _run_replica(2, [job, merged])
    outs = got["lora"]["outs"]
    for j, n in enumerate(names):
        for (toks, reason, lps), (want_t, want_lp) in zip(outs[j::3], references[n]):
            assert reason == "length" and toks == want_t
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lp), atol=1e-4, rtol=0)
    assert [t for t, _, _ in got["merged"]["outs"]] == [t for t, _ in references["a"]]


def test_meta_layout_base_with_unmerged_adapters_matches_peft(setup: dict[str, Any], references: dict,
                                                              tmp_path: Path) -> None:
    """The same HF-trained adapters on the base saved in Meta's layout (q/k rows in Meta's order)."""
    from batchgen.checkpoint import load_args, load_model
    from batchgen.checkpoint_save import save_meta

    base = setup["dir"] / "base"
    save_meta(load_model(base, dtype="float32", device="cpu").state_dict(), load_args(base), tmp_path / "meta")
    llm = LLM(tmp_path / "meta", dtype="float32", device="cpu", kv_cache_bytes=1 << 22, max_num_seqs=8,
              adapters={"a": setup["a"], "b": setup["b"]})
    names = ["b", None, "a"]
    outs = llm.generate([p for p in PROMPTS for _ in names], [params(n) for _ in PROMPTS for n in names])
    for j, n in enumerate(names):
        check(outs[j::3], references[n])
