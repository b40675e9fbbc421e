"""Checkpoint loading errors, tensor-parallel slicing, dtypes and zero-copy loading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen.checkpoint import CheckpointError, detect_layout, load_args, load_model
from batchgen.checkpoint_save import save_hf, save_meta
from batchgen.model import ModelArgs, Transformer, split_fused_weights

COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def tiny_args(**kw: object) -> ModelArgs:
    base: dict = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight random (norms too), so a slice taken from the wrong place cannot match."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return split_fused_weights(sd, args)  # checkpoint names: wq, wk, wv, w1, w3 apart


def checkpoint_sd(model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under checkpoint names (fused weights split, this rank's slices)."""
    return split_fused_weights(model.state_dict(), model.args, model.world_size)


def write(layout: str, args: ModelArgs, out: Path, num_shards: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = random_weights(args, seed)
    if layout == "meta":
        save_meta(sd, args, out, num_shards)
    else:
        save_hf(sd, args, out)
    return sd


def cpu32(path: Path, **kw: object) -> Transformer:
    return load_model(path, dtype="float32", device="cpu", **kw)


# --------------------------------------------------------------------------------------------
# Layout detection and config errors
# --------------------------------------------------------------------------------------------


def test_detect_layout(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path / "m")
    write("hf", tiny_args(), tmp_path / "h")
    assert detect_layout(tmp_path / "m") == "meta"
    assert detect_layout(tmp_path / "h") == "hf"


@pytest.mark.parametrize("files, expect", [
    ({}, "expected params.json + consolidated.*.pth"),
    ({"params.json": "{}"}, "no consolidated.NN.pth"),
    ({"consolidated.00.pth": ""}, "params.json is missing"),
    ({"config.json": "{}", "pytorch_model.bin": ""}, "no model.safetensors"),
    ({"model.safetensors": ""}, "config.json is missing"),
])
def test_incomplete_directory_is_refused(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(expect)) as e:
        load_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        detect_layout(tmp_path / "nope")


@pytest.mark.parametrize("edit, expect", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters type 'llama3'"),
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": "32"}, "'hidden_size' must be int"),
    ({"num_attention_heads": 5}, "not divisible"),
    ({"intermediate_size": None}, "missing required field 'intermediate_size'"),
])
def test_unsupported_hf_config_is_refused(tmp_path: Path, edit: dict, expect: str) -> None:
    write("hf", tiny_args(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(CheckpointError, match=expect) as e:
        load_model(tmp_path, device="cpu")
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("text, expect", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"n_layers": 2, "n_heads": 4}', "missing required field 'dim'"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4, "use_scaled_rope": true}', "use_scaled_rope"),
    ('{"dim": 32, "n_layers": true, "n_heads": 4}', "'n_layers' must be int"),
])
def test_bad_params_json_is_refused(tmp_path: Path, text: str, expect: str) -> None:
    write("meta", tiny_args(), tmp_path)
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(CheckpointError, match=expect) as e:
        load_args(tmp_path)
    assert str(tmp_path / "params.json") in str(e.value)


def test_meta_vocab_size_minus_one_comes_from_embedding(tmp_path: Path) -> None:
    write("meta", tiny_args(vocab_size=37), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert load_args(tmp_path).vocab_size == 37
    assert cpu32(tmp_path).output.weight.shape == (37, 32)


# --------------------------------------------------------------------------------------------
# Damaged or mismatched weight files
# --------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_pth_is_refused(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path, num_shards=2)
    truncate(tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        cpu32(tmp_path)
    assert str(tmp_path / "consolidated.01.pth") in str(e.value)


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    write("hf", tiny_args(), tmp_path)
    truncate(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        cpu32(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value)


class _RunsCodeWhenUnpickled:
    """Unpickling this (without weights_only) would create ``marker``: a stand-in for malware."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def test_pickled_python_object_is_refused_not_executed(tmp_path: Path) -> None:
    args = tiny_args()
    sd: dict = dict(random_weights(args))
    marker = tmp_path / "code-ran"
    sd["extra"] = _RunsCodeWhenUnpickled(marker)
    ckpt = tmp_path / "ckpt"
    save_meta(random_weights(args), args, ckpt)
    torch.save(sd, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        cpu32(ckpt)
    assert str(ckpt / "consolidated.00.pth") in str(e.value)
    assert not marker.exists()


def test_pth_holding_a_non_dict_is_refused(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="expected a dict of name -> tensor"):
        cpu32(tmp_path)


def edit_pth(path: Path, fn) -> None:  # noqa: ANN001 - small test helper
    sd = {k: v.clone() for k, v in torch.load(path, weights_only=True).items()}
    fn(sd)
    torch.save(sd, path)


def edit_safetensors(path: Path, fn) -> None:  # noqa: ANN001
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_meta_missing_key(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path)
    edit_pth(tmp_path / "consolidated.00.pth", lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 key.*layers\.1\.feed_forward\.w3\.weight") as e:
        cpu32(tmp_path)
    assert str(tmp_path / "consolidated.00.pth") in str(e.value)


def test_meta_unknown_key(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path)
    edit_pth(tmp_path / "consolidated.00.pth", lambda sd: sd.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attention\.bias'.*unknown key") as e:
        cpu32(tmp_path)
    assert str(tmp_path / "consolidated.00.pth") in str(e.value)


def test_meta_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path)
    edit_pth(tmp_path / "consolidated.00.pth", lambda sd: sd.update({"layers.1.ffn_norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"'layers\.1\.ffn_norm\.weight'.*expected \(32,\).*got \(31,\)"):
        cpu32(tmp_path)


def test_meta_shards_must_agree_and_be_numbered_without_gaps(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path, num_shards=2)
    edit_pth(tmp_path / "consolidated.01.pth", lambda sd: sd.pop("norm.weight"))
    with pytest.raises(CheckpointError, match="keys differ") as e:
        cpu32(tmp_path)
    assert "consolidated.01.pth" in str(e.value)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="numbered"):
        cpu32(tmp_path)


def test_hf_missing_unknown_and_misshapen_keys(tmp_path: Path) -> None:
    write("hf", tiny_args(), tmp_path)
    st = tmp_path / "model.safetensors"
    edit_safetensors(st, lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 key.*model\.layers\.0\.mlp\.up_proj\.weight") as e:
        cpu32(tmp_path)
    assert str(st) in str(e.value)

    edit_safetensors(st, lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 33)}))
    with pytest.raises(CheckpointError, match=r"up_proj.*expected \(96, 32\).*got \(96, 33\)") as e:
        cpu32(tmp_path)
    assert str(st) in str(e.value)

    def add_bias(sd: dict) -> None:
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(96, 32)
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    edit_safetensors(st, add_bias)
    with pytest.raises(CheckpointError, match=r"unknown key 'model\.layers\.0\.self_attn\.q_proj\.bias'") as e:
        cpu32(tmp_path)
    assert str(st) in str(e.value)

    # HF's old rotary cache buffer is not a weight; it is ignored, not an unknown key.
    edit_safetensors(st, lambda sd: (sd.pop("model.layers.0.self_attn.q_proj.bias"),
                                     sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})))
    cpu32(tmp_path)


def test_hf_index_naming_a_missing_shard(tmp_path: Path) -> None:
    write("hf", tiny_args(), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors") as e:
        cpu32(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


# --------------------------------------------------------------------------------------------
# Tensor-parallel slicing
# --------------------------------------------------------------------------------------------


def tp_dim(name: str) -> int | None:
    if name.endswith(COLUMN_PARALLEL):
        return 0
    return 1 if name.endswith(ROW_PARALLEL) else None


@pytest.mark.parametrize("layout, num_shards, world_size", [
    ("meta", 1, 2), ("meta", 2, 2), ("hf", 1, 2),
    ("meta", 2, 4),  # file count != world size: merged, then re-sliced
])
def test_tp_rank_slices_concatenate_to_full_weights(tmp_path: Path, layout: str, num_shards: int,
                                                    world_size: int) -> None:
    args = tiny_args(n_heads=4, n_kv_heads=4 if world_size == 4 else 2)
    full = write(layout, args, tmp_path, num_shards)
    ranks = [checkpoint_sd(cpu32(tmp_path, world_size=world_size, rank=r)) for r in range(world_size)]
    for name, want in full.items():
        dim = tp_dim(name)
        if dim is None:  # embeddings, output head, norms: whole on every rank
            for sd in ranks:
                torch.testing.assert_close(sd[name], want, rtol=0, atol=0)
        else:
            assert ranks[0][name].shape[dim] == want.shape[dim] // world_size
            torch.testing.assert_close(torch.cat([sd[name] for sd in ranks], dim), want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["meta", "hf"])
@pytest.mark.parametrize("n_kv_heads, world_size", [(1, 2), (2, 4)])
def test_tp_replicates_kv_heads_when_fewer_than_ranks(tmp_path: Path, layout: str, n_kv_heads: int,
                                                      world_size: int) -> None:
    args = tiny_args(n_heads=4, n_kv_heads=n_kv_heads)
    full = write(layout, args, tmp_path)
    hd = args.head_dim
    for rank in range(world_size):
        sd = checkpoint_sd(cpu32(tmp_path, world_size=world_size, rank=rank))
        head = rank * n_kv_heads // world_size
        for name in ("layers.1.attention.wk.weight", "layers.1.attention.wv.weight"):
            torch.testing.assert_close(sd[name], full[name][head * hd:(head + 1) * hd], rtol=0, atol=0)
        q_rows = args.n_heads // world_size * hd
        torch.testing.assert_close(sd["layers.1.attention.wq.weight"],
                                   full["layers.1.attention.wq.weight"][rank * q_rows:(rank + 1) * q_rows])


def test_tp_world_size_must_divide_heads(tmp_path: Path) -> None:
    write("meta", tiny_args(), tmp_path)
    with pytest.raises(CheckpointError, match="n_heads=4 is not divisible by tensor-parallel world_size=3"):
        cpu32(tmp_path, world_size=3, rank=0)
    with pytest.raises(CheckpointError, match="rank 2 of world_size 2"):
        cpu32(tmp_path, world_size=2, rank=2)


# --------------------------------------------------------------------------------------------
# Dtypes, tying, zero-copy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_dtype_auto_is_fp32_on_cpu_and_bf16_loads(tmp_path: Path, layout: str) -> None:
    write(layout, tiny_args(), tmp_path)
    fp32 = load_model(tmp_path, dtype="auto", device="cpu")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert not fp32.training
    bf16 = load_model(tmp_path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    tokens = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        want, got = fp32.logits_full(tokens), bf16.logits_full(tokens)
    assert got.dtype == torch.float32  # logits are always fp32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_tied_embeddings_round_trip(tmp_path: Path, layout: str) -> None:
    args = tiny_args(tie_word_embeddings=True)
    full = write(layout, args, tmp_path)
    model = cpu32(tmp_path)
    torch.testing.assert_close(model.output.weight, full["tok_embeddings.weight"], rtol=0, atol=0)
    if layout == "hf":
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
        assert model.output.weight is model.tok_embeddings.weight  # still one parameter


def test_writers_reject_a_state_dict_that_does_not_match_args(tmp_path: Path) -> None:
    args = tiny_args()
    sd = random_weights(args)
    with pytest.raises(ValueError, match="missing"):
        save_hf({k: v for k, v in sd.items() if k != "norm.weight"}, args, tmp_path)
    with pytest.raises(ValueError, match=r"'norm.weight'.*\(33,\)"):
        save_meta({**sd, "norm.weight": torch.ones(33)}, args, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
def test_meta_weights_are_served_from_the_mapped_file(tmp_path: Path) -> None:
    """fp32 on CPU from a 1-file Meta checkpoint: parameters live in the mmap of the .pth, so
    loading made no second copy in memory. The fused q/k/v and w1/w3 weights are the exception:
    concatenated at load, they are the one copy (their pieces are not kept)."""
    write("meta", tiny_args(), tmp_path)
    model = cpu32(tmp_path)
    pth = str(tmp_path / "consolidated.00.pth")
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == pth:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi))
    assert maps, "checkpoint file is not memory-mapped"
    fused = (".attention.wqkv.", ".feed_forward.w13.")
    for name, p in model.named_parameters():
        mapped = any(lo <= p.data_ptr() < hi for lo, hi in maps)
        if any(f in name for f in fused):
            assert not mapped, f"{name} should be the fused copy"
        else:
            assert mapped, f"{name} was copied out of the mapped file"
    assert sum(any(f in name for f in fused) for name, _ in model.named_parameters()) == 2 * model.args.n_layers


def test_save_meta_splits_like_meta_model_parallel_files(tmp_path: Path) -> None:
    """Meta's reference code (fairscale layers) splits: ColumnParallel wq/wk/wv/w1/w3/output on
    dim 0, RowParallel wo/w2 and ParallelEmbedding on dim 1; norms are replicated."""
    args = tiny_args(n_kv_heads=2)
    full = write("meta", args, tmp_path, num_shards=2)
    shards = [torch.load(tmp_path / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    split = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
             "layers.0.attention.wq.weight": 0, "layers.0.attention.wk.weight": 0,
             "layers.0.attention.wv.weight": 0, "layers.0.attention.wo.weight": 1,
             "layers.0.feed_forward.w1.weight": 0, "layers.0.feed_forward.w2.weight": 1,
             "layers.0.feed_forward.w3.weight": 0, "layers.0.attention_norm.weight": None,
             "layers.0.ffn_norm.weight": None}
    for name, dim in split.items():
        if dim is None:
            assert all(torch.equal(s[name], full[name]) for s in shards), name
        else:
            assert torch.equal(torch.cat([s[name] for s in shards], dim), full[name]), name
    params = json.loads((tmp_path / "params.json").read_text())
    assert set(params) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                           "ffn_dim_multiplier", "norm_eps", "rope_theta"}


def test_loading_does_not_import_dynamo(tmp_path: Path) -> None:
    # Initialisers run on the meta device import torch._dynamo (about a second of every replica's
    # start); loading must build the model without them. A fresh process, since pytest's has
    # likely imported it already.
    write("hf", tiny_args(), tmp_path)
    code = ("import sys, torch; already = 'torch._dynamo' in sys.modules\n"
            "from batchgen.checkpoint import load_model\n"
            "from batchgen.model import count_parameters\n"
            "m = load_model(sys.argv[1], dtype='float32', device='cpu')\n"
            "assert count_parameters(m.args) == sum(p.numel() for p in m.parameters())\n"
            "print(already, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    already, after = out.stdout.split()
    if already == "True":
        pytest.skip("this torch imports torch._dynamo with torch itself")
    assert after == "False"
