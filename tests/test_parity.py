"""batchgen's model, loaded by batchgen.checkpoint, matches transformers' LlamaForCausalLM.

Tiny random HF models (MHA, GQA, MQA; tied and untied) are written with ``save_pretrained``,
loaded with :func:`load_model`, and compared on logits and on 20 greedy tokens; the same weights
re-written by :func:`save_meta` (1 and 2 model-parallel files) and :func:`save_hf` must give the
same results. The real stories260K checkpoint must reproduce its known greedy continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from batchgen.checkpoint import load_args, load_model
from batchgen.checkpoint_save import save_hf, save_meta
from reference import model_greedy, reference_greedy

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

PROMPT = [1, 5, 7]
STEPS = 20
STORIES_FIRST_TEN = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456]


def hf_greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps,
                             min_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


CASES = {
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    "mqa-untied-3layers": dict(num_key_value_heads=1, num_hidden_layers=3, intermediate_size=172),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            tiny_hf_config: Any) -> dict[str, Any]:
    """A seeded random HF model saved to disk, with its reference logits and greedy tokens."""
    name = request.param
    # initializer_range 0.1 (not 0.02) so logits are peaked enough that greedy picks are robust;
    # no EOS so every run produces all STEPS tokens.
    config = tiny_hf_config(initializer_range=0.1, eos_token_id=None, **CASES[name])
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out / "hf", safe_serialization=True)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return {"dir": out, "model": model, "tokens": tokens, "logits": logits,
            "greedy": hf_greedy(model, PROMPT, STEPS)}


def test_hf_layout_matches_transformers(hf_case: dict[str, Any]) -> None:
    model = load_model(hf_case["dir"] / "hf", dtype="float32", device="cpu")
    with torch.no_grad():
        assert_logits_close(model.logits_full(hf_case["tokens"]), hf_case["logits"])
    assert model_greedy(model, PROMPT, STEPS) == hf_case["greedy"]
    assert reference_greedy(model, PROMPT, STEPS) == hf_case["greedy"]  # the engine tests' reference too


@pytest.mark.parametrize("num_shards", [1, 2])
def test_meta_layout_of_same_weights_matches(hf_case: dict[str, Any], num_shards: int) -> None:
    src = hf_case["dir"] / "hf"
    args = load_args(src)
    meta_dir = hf_case["dir"] / f"meta{num_shards}"
    weights = load_model(src, dtype="float32", device="cpu").state_dict()
    if args.n_kv_heads % num_shards:
        # Meta's code gives every model-parallel file whole KV heads; MQA can't be split in two.
        with pytest.raises(ValueError, match="n_kv_heads=1 cannot be split"):
            save_meta(weights, args, meta_dir, num_shards)
        return
    save_meta(weights, args, meta_dir, num_shards)
    assert len(list(meta_dir.glob("consolidated.*.pth"))) == num_shards
    model = load_model(meta_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        assert_logits_close(model.logits_full(hf_case["tokens"]), hf_case["logits"])
    assert model_greedy(model, PROMPT, STEPS) == hf_case["greedy"]
    assert reference_greedy(model, PROMPT, STEPS) == hf_case["greedy"]  # the engine tests' reference too


def test_save_hf_output_loads_in_transformers(hf_case: dict[str, Any]) -> None:
    # Checks the writer against the reference implementation, not just against our own reader.
    src = hf_case["dir"] / "hf"
    out = hf_case["dir"] / "resaved-hf"
    save_hf(load_model(src, dtype="float32", device="cpu").state_dict(), load_args(src), out)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert_logits_close(reloaded(hf_case["tokens"]).logits.float(), hf_case["logits"])
    assert load_args(out) == load_args(src)


def test_sharded_hf_checkpoint_loads(tmp_path: Path, tiny_hf_config: Any) -> None:
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(tiny_hf_config(initializer_range=0.1)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert_logits_close(load_model(tmp_path, dtype="float32", device="cpu").logits_full(tokens), want)


@pytest.fixture(scope="module")
def stories_reference(shared_dir: Path) -> list[int]:
    """Greedy tokens from ``[1]`` by transformers on the real HF copy of stories260K."""
    hf = transformers.LlamaForCausalLM.from_pretrained(shared_dir / "models" / "stories260K-hf").eval()
    return hf_greedy(hf, [1], STEPS)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_real_stories260k_greedy(shared_dir: Path, stories_reference: list[int], layout: str) -> None:
    assert stories_reference[:10] == STORIES_FIRST_TEN
    model = load_model(shared_dir / "models" / f"stories260K-{layout}", dtype="float32", device="cpu")
    got = model_greedy(model, [1], STEPS)
    assert got[:10] == STORIES_FIRST_TEN
    assert got == stories_reference
    assert reference_greedy(model, [1], STEPS) == stories_reference
