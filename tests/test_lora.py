"""LoRA adapters: PEFT's files mapped onto batchgen, checked against transformers + peft."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen.checkpoint import load_args, load_model
from batchgen.checkpoint_save import save_meta
from batchgen.engine.adapters import LoraStack, lora_forward, lora_rows
from batchgen.lora import AdapterError, LoraAdapter, LoraWeights, load_adapter, merge_into_state_dict
from batchgen.lora import save_adapter as bg_save_adapter
from batchgen.model import ModelArgs, Transformer, split_fused_weights

peft = pytest.importorskip("peft", reason="peft is a test dependency")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 17, 45, 99, 3, 250, 8], [1, 200, 5, 61]]


def hf_base(tiny_hf_config: Callable[..., Any], seed: int = 0, **kw: Any) -> Any:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_hf_config(**kw)).eval()


def save_adapter(base: Any, out: Path, *, targets: Any = ALL7, r: int = 8, alpha: float = 16, rslora: bool = False,
                 safe: bool = True, seed: int = 1, **kw: Any) -> Path:
    """A PEFT adapter with non-zero B (init_lora_weights=False) on a copy of ``base``, saved to ``out``."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                          init_lora_weights=False, **kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # PyTorch's default init of B is large; keep the model's logits sane
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.2)
    pm.save_pretrained(str(out), safe_serialization=safe)
    return out


def peft_model(base: Any, adapter_dir: Path) -> Any:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def merged(base_dir: Path, adapter_dir: Path) -> Transformer:
    """batchgen's model from ``base_dir`` with the adapter merged at load (before q/k/v, w1/w3 are fused)."""
    adapter = load_adapter(adapter_dir, load_args(base_dir), "a")
    return load_model(base_dir, dtype="float32", device="cpu", adapters=[adapter])


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def bg_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(model.logits_full(torch.tensor([toks]))[0, -1].argmax()))
    return toks[len(prompt):]


def assert_same_as_peft(bg: Transformer, ref: Any, base: Any | None = None) -> None:
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = ref(input_ids=ids).logits.float()
        with torch.inference_mode():
            got = bg.logits_full(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if base is not None:  # the adapter really changes the model
            with torch.no_grad():
                assert (base(input_ids=ids).logits - want).abs().max() > 1e-2
        assert bg_greedy(bg, prompt, 8) == hf_greedy(ref, prompt, 8)


@pytest.mark.parametrize("layout", ["hf", "meta"])
@pytest.mark.parametrize("targets,rslora,safe", [
    (ALL7, False, True), (["q_proj", "v_proj"], False, True), (ALL7, True, False), (["q_proj", "v_proj"], True, False),
    (ALL7, False, False),
])
def test_merged_adapter_matches_peft(tmp_path: Path, tiny_hf_config: Callable[..., Any], layout: str,
                                     targets: list[str], rslora: bool, safe: bool) -> None:
    base = hf_base(tiny_hf_config)
    base_dir = tmp_path / "base-hf"
    base.save_pretrained(str(base_dir))
    if layout == "meta":  # the same weights in Meta's layout (q/k rows in Meta's order)
        args = load_args(base_dir)
        save_meta(load_model(base_dir, dtype="float32", device="cpu").state_dict(), args, tmp_path / "base-meta")
        base_dir = tmp_path / "base-meta"
    ad = save_adapter(base, tmp_path / "adapter", targets=targets, rslora=rslora, safe=safe, r=4 if rslora else 8)
    assert (ad / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    assert_same_as_peft(merged(base_dir, ad), peft_model(base, ad), base)


def test_rank_and_alpha_patterns_and_layers_to_transform(tmp_path: Path, tiny_hf_config: Callable[..., Any]) -> None:
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(tmp_path / "base"))
    ad = save_adapter(base, tmp_path / "ad", targets=ALL7, r=4, alpha=8, layers_to_transform=[1],
                      rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3})
    adapter = load_adapter(ad, load_args(tmp_path / "base"), "p")
    assert {layer for layer, _ in adapter.weights} == {1}
    assert adapter.weights[(1, "wq")].rank == 2 and adapter.weights[(1, "w2")].rank == 6
    assert adapter.weights[(1, "wv")].scale == pytest.approx(3 / 4)
    assert_same_as_peft(merged(tmp_path / "base", ad), peft_model(base, ad), base)


def test_saved_adapter_reads_back_in_batchgen_and_peft(tmp_path: Path, tiny_hf_config: Callable[..., Any]) -> None:
    """save_adapter writes PEFT's format: HF names and q/k order, read the same by both."""
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(tmp_path / "base"))
    args = load_args(tmp_path / "base")
    ad = random_adapter("mine", args, 4, ("wq", "wk", "wv", "wo", "w1", "w3", "w2"), 0, layers=2)
    for w in ad.weights.values():
        w.B.mul_(0.05)
    out = bg_save_adapter(ad, args, tmp_path / "saved")
    back = load_adapter(out, args, "mine")
    assert back.fingerprint == ad.fingerprint
    assert_same_as_peft(merged(tmp_path / "base", out), peft_model(base, out), base)


def test_regex_target_modules(tmp_path: Path, tiny_hf_config: Callable[..., Any]) -> None:
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(tmp_path / "base"))
    ad = save_adapter(base, tmp_path / "ad", targets=r".*\.0\.(self_attn\.k_proj|mlp\.up_proj)")
    adapter = load_adapter(ad, load_args(tmp_path / "base"), "x")
    assert set(adapter.weights) == {(0, "wk"), (0, "w3")}
    assert_same_as_peft(merged(tmp_path / "base", ad), peft_model(base, ad), base)


def test_real_checkpoint_adapter_from_hf_copy_applies_to_meta_copy(tmp_path: Path, shared_dir: Path) -> None:
    """An adapter trained against the HF copy of stories260K, run by batchgen on the Meta copy."""
    hf_dir, meta_dir = shared_dir / "models" / "stories260K-hf", shared_dir / "models" / "stories260K-meta"
    base = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    ad = save_adapter(base, tmp_path / "ad", targets=ALL7, r=8, alpha=16)
    ref = peft_model(base, ad)
    assert_same_as_peft(merged(meta_dir, ad), ref, base)
    assert_same_as_peft(merged(hf_dir, ad), ref)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def good_adapter(tmp_path: Path, tiny_hf_config: Callable[..., Any]) -> tuple[Path, ModelArgs]:
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(tmp_path / "base"))
    return save_adapter(base, tmp_path / "ad", targets=["q_proj", "v_proj"], r=4), load_args(tmp_path / "base")


def edit_config(ad: Path, **kw: Any) -> None:
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(kw)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))


def edit_weights(ad: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = ad / "adapter_model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


@pytest.mark.parametrize("edit,expect", [
    (dict(bias="lora_only"), "bias='lora_only' is not supported"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head'] is not supported"),
    (dict(use_dora=True), "use_dora=true (DoRA) is not supported"),
    (dict(peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING' is not supported; only LORA"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "target_modules ['embed_tokens'] not supported"),
    (dict(target_modules=["q_proj"]), "is a module the config's target_modules"),
    (dict(r=0), "field 'r' must be a positive number, got 0"),
    (dict(layers_to_transform=[7]), "layers_to_transform [7] must be layer indices below n_layers=2"),
])
def test_config_refusals(good_adapter: tuple[Path, ModelArgs], edit: dict, expect: str) -> None:
    ad, args = good_adapter
    edit_config(ad, **edit)
    with pytest.raises(AdapterError) as e:
        load_adapter(ad, args, "x")
    assert str(ad / "adapter_config.json") in str(e.value) or str(ad / "adapter_model.safetensors") in str(e.value)
    assert expect in str(e.value)


def test_weight_refusals(good_adapter: tuple[Path, ModelArgs]) -> None:
    ad, args = good_adapter
    st = str(ad / "adapter_model.safetensors")
    key_a = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    original = load_file(st)
    assert key_a in original

    edit_weights(ad, lambda sd: sd.pop(key_a))
    with pytest.raises(AdapterError, match=r"missing 1 LoRA weight\(s\).*layers\.1\.self_attn\.v_proj\.lora_A") as e:
        load_adapter(ad, args, "x")
    assert st in str(e.value)

    save_file({**original, key_a: torch.zeros(4, 65)}, st)
    with pytest.raises(AdapterError, match=r"has shape \(4, 65\); expected \(4, 64\)"):
        load_adapter(ad, args, "x")

    save_file({**original, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, st)
    with pytest.raises(AdapterError, match="unknown target module"):
        load_adapter(ad, args, "x")

    save_file(original, st)
    with pytest.raises(AdapterError, match=r"shape \(4, 64\); expected \(4, 32\)"):  # a model it wasn't made for
        load_adapter(ad, ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300), "x")

    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter weights; expected adapter_model.safetensors or adapter_model.bin"):
        load_adapter(ad, args, "x")
    (ad / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: file is missing"):
        load_adapter(ad, args, "x")


def test_adapter_name_infix_and_fan_in_fan_out_flag_are_read(good_adapter: tuple[Path, ModelArgs]) -> None:
    """Keys written as lora_A.<adapter>.weight load the same; fan_in_fan_out does not change a
    LLaMA adapter's factors (lora_A/lora_B are Linear layers either way)."""
    ad, args = good_adapter
    want = load_adapter(ad, args, "x")
    edit_weights(ad, lambda sd: sd.update({k.replace(".weight", ".default.weight"): sd.pop(k) for k in list(sd)}))
    edit_config(ad, fan_in_fan_out=True)
    got = load_adapter(ad, args, "x")
    assert got.fingerprint == want.fingerprint


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_pickled_python_object_in_bin_is_refused(tmp_path: Path) -> None:
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["q_proj"]}))
    torch.save({"x": _Evil()}, ad / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin: refused: .*weights_only=True"):
        load_adapter(ad, ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300), "x")


# ---------------------------------------------------------------------------------------------
# Unmerged forms and TP slicing (synthetic adapters)
# ---------------------------------------------------------------------------------------------


def random_adapter(name: str, args: ModelArgs, r: int, projs: tuple[str, ...], seed: int, layers: int = 1) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    q, kv, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    shapes = {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q),
              "w1": (ffn, args.dim), "w3": (ffn, args.dim), "w2": (args.dim, ffn)}
    ws = {(layer, p): LoraWeights(torch.randn(r, shapes[p][1], generator=g), torch.randn(shapes[p][0], r, generator=g),
                                  0.5 + seed)
          for layer in range(layers) for p in projs}
    return LoraAdapter(name, f"/synthetic/{name}", ws)


def lora_reference(x: torch.Tensor, proj: str, layer: int, index: torch.Tensor,
                   adapters: list[LoraAdapter], out_features: int) -> torch.Tensor:
    """The naive per-row form: row t gets ``x[t] @ delta.T`` of its adapter, or zeros for a base
    row or an adapter that leaves ``proj`` alone."""
    out = []
    for t in range(x.shape[0]):
        s = int(index[t])
        if s < 0 or (layer, proj) not in adapters[s].weights:
            out.append(x.new_zeros(out_features))
        else:
            out.append(adapters[s].delta(layer, proj) @ x[t])
    return torch.stack(out)


ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96)


OUT = {"wq": 64, "wk": 32, "wv": 32, "wo": 64, "w1": 96, "w3": 96, "w2": 64}
FUSE = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def mixed_adapters() -> list[LoraAdapter]:
    return [random_adapter("a", ARGS, 4, ("wq", "wk", "wv", "wo", "w1", "w3", "w2"), 0),
            random_adapter("b", ARGS, 16, ("wq", "wv", "w2"), 1),  # another rank, q/v only (no wk)
            random_adapter("unused", ARGS, 8, ("wq",), 2)]


@pytest.mark.parametrize("method", ["segments", "grouped", "gathered", "masked", "auto"])
def test_lora_forward_matches_per_row_reference(method: str) -> None:
    adapters = mixed_adapters()
    stack = LoraStack(adapters, ARGS)
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([-1, 0, 1, 1, -1, 0, 0, 1, -1, 1])  # base rows, adapter a, adapter b (other rank)
    rows = lora_rows(index, len(adapters))
    for proj in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
        in_f = {"wo": 64, "w2": 96}.get(proj, 64)
        x = torch.randn(len(index), in_f, generator=g)
        got = lora_forward(x, proj, 0, rows, stack, method=method)
        want = lora_reference(x, proj, 0, index, adapters, OUT[proj])
        assert want[index >= 0].abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert got[index < 0].abs().max() == 0
        again = lora_forward(x, proj, 0, index, stack, method=method)  # a plain index works too
        torch.testing.assert_close(again, got)
        base = torch.randn(len(index), OUT[proj], generator=g)
        into = base.clone()
        assert lora_forward(x, proj, 0, rows, stack, method=method, out=into) is into  # added in place
        torch.testing.assert_close(into, base + want, atol=1e-4, rtol=1e-4)
    assert lora_forward(torch.randn(3, 64), "wq", 5, torch.tensor([0, 1, -1]), stack) is None
    assert stack.slot("b") == 1
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        stack.slot("zz")


def test_rows_runs_group_consecutive_rows_of_one_adapter_and_skip_base_rows() -> None:
    slots = [-1, 0, 0, 1, -1, 1, 1, 2]
    from_host = lora_rows(torch.tensor(slots), 3, slots)
    assert from_host.runs == [(0, 1, 3), (1, 3, 4), (1, 5, 7), (2, 7, 8)]
    assert lora_rows(torch.tensor(slots), 3).runs == from_host.runs  # from the index alone
    assert lora_rows(torch.tensor([-1, -1]), 1).runs == [] and lora_rows(torch.tensor([0]), 1).runs == [(0, 0, 1)]


@pytest.mark.parametrize("method", ["segments", "grouped", "gathered", "masked"])
def test_fused_projections_equal_their_parts_side_by_side(method: str) -> None:
    adapters = mixed_adapters()
    stack = LoraStack(adapters, ARGS, fuse=FUSE)
    assert (0, "wqkv") in stack.projs and (0, "wq") not in stack.projs and (0, "wo") in stack.projs
    index = torch.tensor([1, -1, 0, 2, 1, 0])
    x = torch.randn(len(index), 64, generator=torch.Generator().manual_seed(4))
    for fused, parts in FUSE.items():
        got = lora_forward(x, fused, 0, index, stack, method=method)
        want = torch.cat([lora_reference(x, p, 0, index, adapters, OUT[p]) for p in parts], dim=1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lora_stack_nbytes_and_fingerprint() -> None:
    a = random_adapter("a", ARGS, 4, ("wq", "wv"), 0)
    assert a.nbytes == 4 * 4 * (64 + 64) + 4 * 4 * (64 + 32)
    assert LoraStack([a], ARGS).nbytes == 2 * a.nbytes  # its slot and the zero slot of base rows
    assert a.fingerprint == random_adapter("a", ARGS, 4, ("wq", "wv"), 0).fingerprint
    assert a.fingerprint != random_adapter("a", ARGS, 4, ("wq", "wv"), 1).fingerprint
    assert a.tp_slice(2, 1, ARGS).fingerprint == a.fingerprint


@pytest.mark.parametrize("n_kv_heads,world_size", [(2, 2), (4, 4), (2, 4), (1, 2)])
def test_tp_slices_reassemble_the_full_update(n_kv_heads: int, world_size: int) -> None:
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=300, hidden_dim=96)
    full = random_adapter("a", args, 8, ("wq", "wk", "wv", "wo", "w1", "w3", "w2"), 0)
    parts = [full.tp_slice(world_size, r, args) for r in range(world_size)]
    hd = args.head_dim
    for proj in ("wq", "w1", "w3"):  # column-parallel: rank slices stack along the output rows
        torch.testing.assert_close(torch.cat([p.delta(0, proj) for p in parts]), full.delta(0, proj))
    for proj in ("wk", "wv"):
        per_rank = [p.delta(0, proj) for p in parts]
        if n_kv_heads >= world_size:
            torch.testing.assert_close(torch.cat(per_rank), full.delta(0, proj))
        else:  # each rank holds the KV head its query heads use: rank r's q heads share kv head r*kv//ws
            for r, d in enumerate(per_rank):
                head = r * n_kv_heads // world_size
                torch.testing.assert_close(d, full.delta(0, proj)[head * hd:(head + 1) * hd])
    x = {"wo": torch.randn(5, 64), "w2": torch.randn(5, 96)}
    for proj in ("wo", "w2"):  # row-parallel: each rank's partial update on its input columns sums to the full one
        n = x[proj].shape[1] // world_size
        partial = sum(x[proj][:, r * n:(r + 1) * n] @ p.delta(0, proj).T for r, p in enumerate(parts))
        torch.testing.assert_close(partial, x[proj] @ full.delta(0, proj).T, atol=1e-4, rtol=1e-4)
        # and lora_forward on each rank's stack gives the same partial sums
        stacks = [LoraStack([p], args) for p in parts]
        idx = torch.zeros(5, dtype=torch.long)
        total = sum(lora_forward(x[proj][:, r * n:(r + 1) * n].contiguous(), proj, 0, idx, s)
                    for r, s in enumerate(stacks))
        torch.testing.assert_close(total, x[proj] @ full.delta(0, proj).T, atol=1e-4, rtol=1e-4)


def test_merge_into_a_tp_slice_needs_the_sliced_adapter(tmp_path: Path, tiny_hf_config: Callable[..., Any]) -> None:
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(tmp_path / "base"))
    args = load_args(tmp_path / "base")
    ad = load_adapter(save_adapter(base, tmp_path / "ad"), args, "a")
    full = merge_into_state_dict(split_fused_weights(load_model(tmp_path / "base", "float32", "cpu").state_dict(), args), ad)
    for rank in range(2):
        sd = split_fused_weights(load_model(tmp_path / "base", "float32", "cpu", world_size=2, rank=rank).state_dict(),
                                 args, world_size=2)
        with pytest.raises(AdapterError, match="needs adapter.tp_slice of the same rank"):
            merge_into_state_dict(sd, ad)
        part = merge_into_state_dict(sd, ad.tp_slice(2, rank, args))
        torch.testing.assert_close(part["layers.0.attention.wq.weight"],
                                   full["layers.0.attention.wq.weight"].chunk(2)[rank])
        torch.testing.assert_close(part["layers.1.feed_forward.w2.weight"],
                                   full["layers.1.feed_forward.w2.weight"].chunk(2, dim=1)[rank])


def test_load_model_merges_adapters_on_each_tp_rank(tmp_path: Path, tiny_hf_config: Callable[..., Any]) -> None:
    """load_model(adapters=...) on a TP rank holds that rank's slice of the merged full model."""
    base = hf_base(tiny_hf_config)
    base.save_pretrained(str(tmp_path / "base"))
    args = load_args(tmp_path / "base")
    ad = load_adapter(save_adapter(base, tmp_path / "ad"), args, "a")
    full = split_fused_weights(load_model(tmp_path / "base", "float32", "cpu", adapters=[ad]).state_dict(), args)
    plain = split_fused_weights(load_model(tmp_path / "base", "float32", "cpu").state_dict(), args)
    assert (full["layers.0.attention.wq.weight"] - plain["layers.0.attention.wq.weight"]).abs().max() > 1e-3
    for rank in range(2):
        part = split_fused_weights(load_model(tmp_path / "base", "float32", "cpu", world_size=2, rank=rank,
                                              adapters=[ad]).state_dict(), args, world_size=2)
        torch.testing.assert_close(part["layers.0.attention.wq.weight"], full["layers.0.attention.wq.weight"].chunk(2)[rank])
        torch.testing.assert_close(part["layers.1.feed_forward.w2.weight"],
                                   full["layers.1.feed_forward.w2.weight"].chunk(2, dim=1)[rank])
