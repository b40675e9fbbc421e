"""Reference helpers for tests: an independent LLaMA forward, greedy decoding, seeded models.

:func:`reference_logits` is Meta's reference forward written out plainly, sharing no code with
``batchgen.model``: separate ``wq``/``wk``/``wv``/``w1``/``w3`` taken from the state dict,
complex-number RoPE, one sequence at a time with an explicit causal mask, no cache, no fusing.
The engine tests compare against it rather than against the model's own ``logits_full``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from batchgen.engine import LLM
from batchgen.engine.graphs import Capture, DecodeGraphs, eager_capture
from batchgen.model import ModelArgs, Transformer


def sharp_model(*, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, vocab_size: int = 300,
                max_seq_len: int = 128, seed: int = 0) -> Transformer:
    """A seeded random LLaMA (dim 64) with its output head scaled by 8.

    Random models are full of near-ties; sharper logits keep a tie decided by the last bit of a
    different summation order (batching, all-reduce) out of tests that are about something else.
    """
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=vocab_size, multiple_of=16, max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)
    return model


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [L, H, D] with interleaved pairs rotated by freqs_cis [L, D/2] (Meta's apply_rotary_emb)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2).type_as(x)


def reference_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Logits [L, vocab] (fp32) of one sequence from position 0, by Meta's plain forward over
    ``model``'s weights (a whole model: ``world_size`` 1)."""
    a = model.args
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    D, Hq, Hkv, L = a.dim // a.n_heads, a.n_heads, a.n_kv_heads, len(tokens)
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, D, 2)[: D // 2].float() / D))
    freqs_cis = torch.polar(torch.ones(L, D // 2), torch.outer(torch.arange(L).float(), freqs))
    mask = torch.full((L, L), float("-inf")).triu(1)
    h = sd["tok_embeddings.weight"][torch.tensor(tokens)]  # [L, dim]
    for i in range(a.n_layers):
        w = {k.removeprefix(f"layers.{i}."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        # The model stores wq|wk|wv and w1|w3 stacked by rows; a checkpoint keeps them apart.
        wq, wk, wv = w["attention.wqkv.weight"].split([Hq * D, Hkv * D, Hkv * D])
        w1, w3 = w["feed_forward.w13.weight"].chunk(2)
        x = _rms_norm(h, w["attention_norm.weight"], a.norm_eps)
        q = _rotary((x @ wq.T).view(L, Hq, D), freqs_cis)
        k = _rotary((x @ wk.T).view(L, Hkv, D), freqs_cis)
        v = (x @ wv.T).view(L, Hkv, D)
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
        scores = q.transpose(0, 1) @ k.permute(1, 2, 0) / math.sqrt(D) + mask  # [Hq, L, L]
        out = torch.softmax(scores.float(), dim=-1).type_as(q) @ v.transpose(0, 1)  # [Hq, L, D]
        h = h + out.transpose(0, 1).reshape(L, Hq * D) @ w["attention.wo.weight"].T
        x = _rms_norm(h, w["ffn_norm.weight"], a.norm_eps)
        h = h + (F.silu(x @ w1.T) * (x @ w3.T)) @ w["feed_forward.w2.weight"].T
    return (_rms_norm(h, sd["norm.weight"], a.norm_eps) @ sd["output.weight"].T).float()


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` by :func:`reference_logits`, re-running the whole
    sequence each step."""
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(reference_logits(model, toks)[-1].argmax()))
    return toks[len(prompt):]


def model_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` by the model's own cache-free ``logits_full``."""
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(model.logits_full(torch.tensor([toks]))[0, -1].argmax()))
    return toks[len(prompt):]


def random_prompts(n: int, seed: int = 1, lo: int = 1, hi: int = 40) -> list[list[int]]:
    """``n`` prompts of random ids in [3, 300), lengths uniform in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def stand_in_graphs(llm: LLM, capture: Capture = eager_capture, max_rows: Optional[int] = None,
                    **kwargs: Any) -> DecodeGraphs:
    """Make ``llm`` replay its decode steps of up to ``max_rows`` rows (default: all) through
    ``capture`` (default: the stand-in that keeps a CUDA graph's contract on any device, see
    tests/test_graphs.py); returns the graphs."""
    llm.runner.graphs = DecodeGraphs(llm.model, llm.kv_cache, llm.max_model_len,
                                     max_rows or llm.max_num_seqs, llm.device, capture, **kwargs)
    return llm.runner.graphs


def random_adapter(args: Any, r: int, projs: tuple[str, ...], seed: int) -> Any:
    """A seeded rank-``r`` LoRA adapter on ``projs`` of every layer of a model with ``args``, large
    enough to visibly change a small model's answers."""
    from batchgen.lora import LoraAdapter, LoraWeights

    g = torch.Generator().manual_seed(seed)
    q, kv, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    shapes = {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q),
              "w1": (ffn, args.dim), "w3": (ffn, args.dim), "w2": (args.dim, ffn)}
    ws = {(layer, p): LoraWeights(torch.randn(r, shapes[p][1], generator=g) * 0.3,
                                  torch.randn(shapes[p][0], r, generator=g) * 0.3, 1.0)
          for layer in range(args.n_layers) for p in projs}
    return LoraAdapter(f"r{seed}", "synthetic", ws)
