"""Write a model's state dict as a checkpoint in Meta's layout or in Hugging Face's layout.

The inverse of ``batchgen.checkpoint``'s loaders, built on the same name and shape tables: the
fused ``wqkv``/``w13`` are split back into q/k/v and w1/w3, HF's q/k rows get its rotate-half
order, and Meta's model-parallel files are cut along the dimension Meta's reference code cuts.
The demo's trainer, the tests and the bench use them to make real checkpoints of either layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from batchgen.checkpoint import _full_shapes, _hf_permute, _leaf, _mp_dim, _to_hf_name
from batchgen.model import ModelArgs, ffn_hidden_dim, split_fused_weights


def _complete_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """``state_dict`` checked against ``args`` (names and full shapes), on CPU, with fused weights
    split into the checkpoint's tensors and the output head filled in from the embedding when tied."""
    sd = split_fused_weights({k: v.detach().cpu() for k, v in state_dict.items()}, args)
    if args.tie_word_embeddings and "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    expected = _full_shapes(args)
    if set(sd) != set(expected):
        raise ValueError(f"state_dict keys do not match the model: missing {sorted(set(expected) - set(sd))[:3]}, "
                         f"unknown {sorted(set(sd) - set(expected))[:3]}")
    for k, t in sd.items():
        if tuple(t.shape) != expected[k]:
            raise ValueError(f"state_dict[{k!r}] has shape {tuple(t.shape)}, expected {expected[k]}")
    return sd


def _meta_ffn_params(args: ModelArgs) -> tuple[int, Optional[float]]:
    """``multiple_of``/``ffn_dim_multiplier`` that make Meta's formula give ``args.hidden_dim``.

    params.json has no FFN-width field; for a width the args' own values don't produce (an HF
    ``intermediate_size``), rounding up to a multiple of the width itself lands on it exactly.
    """
    if ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) == args.hidden_dim:
        return args.multiple_of, args.ffn_dim_multiplier
    mult = args.hidden_dim / int(2 * 4 * args.dim / 3)
    if ffn_hidden_dim(args.dim, args.hidden_dim, mult) != args.hidden_dim:
        raise ValueError(f"FFN width {args.hidden_dim} cannot be expressed in Meta's params.json for dim={args.dim}")
    return args.hidden_dim, mult


def save_meta(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
              num_shards: int = 1) -> None:
    """Write ``params.json`` + ``consolidated.NN.pth`` (``num_shards`` model-parallel files).

    ``state_dict`` is a whole model's (``Transformer.state_dict()``, fused weights split here) or
    uses Meta's names for every tensor; full shapes. A tied output head is written out
    as an ordinary ``output.weight`` (Meta's format has no tying).
    """
    sd = _complete_state_dict(state_dict, args)
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("FFN width", args.hidden_dim),
                    ("dim", args.dim)):
        if num_shards < 1 or n % num_shards:
            raise ValueError(f"{what}={n} cannot be split into num_shards={num_shards} model-parallel files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for k, t in sd.items():
        mp = _mp_dim(k)
        pieces = t.chunk(num_shards, mp) if mp is not None and num_shards > 1 else [t] * num_shards
        for shard, piece in zip(shards, pieces):
            # clone: torch.save writes a view's whole storage, and tied tensors share one.
            shard[k] = piece.contiguous().clone()
    for i, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    multiple_of, ffn_mult = _meta_ffn_params(args)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
              "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "multiple_of": multiple_of,
              "ffn_dim_multiplier": ffn_mult, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")


def save_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.LlamaForCausalLM`` loads.

    ``state_dict`` is a whole model's or uses Meta's names (as for :func:`save_meta`); q/k rows
    get HF's rotate-half order. A tied output
    head is not written (HF re-ties it from ``tie_word_embeddings``).
    """
    sd = _complete_state_dict(state_dict, args)
    tensors = {}
    for k, t in sd.items():
        if k == "output.weight" and args.tie_word_embeddings:
            continue
        heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}.get(_leaf(k))
        if heads is not None:
            t = _hf_permute(t, heads)
        tensors[_to_hf_name(k)] = t.contiguous().clone()  # safetensors refuses shared storage
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(sd["tok_embeddings.weight"].dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["save_hf", "save_meta"]
