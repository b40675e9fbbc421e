"""The LLaMA decoder, in one file.

Module and parameter names equal Meta's checkpoint keys (``tok_embeddings``,
``layers.N.attention.wq``, ``feed_forward.w1`` ...), so a ``consolidated.*.pth`` state dict loads
with no key map. Hugging Face checkpoints are mapped onto these names by ``batchgen.checkpoint``.

The forward pass works on a *packed* batch: the new tokens of every sequence in the step are
concatenated into one ``[T]`` vector, so the linear layers never compute on padding. Attention
is the only part that needs to know where one sequence ends and the next begins; it reads that
from an :class:`AttentionMetadata` the engine builds (or, with no KV cache, from ``cu_seqlens``).

Inference runs decode attention straight from the paged KV cache (no per-layer copies), builds
masks, RoPE angles and cache addresses once per step (``_Step``), and runs q/k/v and w1/w3 as one
matmul each; with autograd on (training) the plain per-parameter path runs instead.

Tensor parallelism (Megatron style) is built in: with ``world_size > 1`` each rank holds
``1/world_size`` of the heads and of the FFN, and the row-parallel projections (``wo``, ``w2``)
all-reduce their output. With ``world_size == 1`` no ``torch.distributed`` call is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    """Shape of a LLaMA model. Field names follow Meta's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit FFN width (HF ``intermediate_size``) wins if set
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        """Args of a named preset (see :data:`PRESETS`), with optional field overrides."""
        key = name.lower()
        if key not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[key], **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Args from a Meta ``params.json`` dict; unknown keys are ignored, ``vocab_size=-1`` kept."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """FFN width exactly as Meta's reference computes it from ``params.json``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Published shapes. Chat variants share their base model's shape.
PRESETS: dict[str, ModelArgs] = {
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6, max_seq_len=2048),
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6, max_seq_len=2048),
    "llama-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6, max_seq_len=2048),
    "llama-65b": ModelArgs(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5, max_seq_len=2048),
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama-2-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=4096,
    ),
}
for _base in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
    PRESETS[_base + "-chat"] = PRESETS[_base]


@dataclass
class AttentionMetadata:
    """Where each sequence of a packed step lives, built by the engine's model runner.

    A step packs ``num_decode`` decode tokens first, then (when ``is_prefill``) the new tokens of
    the sequences being prefilled. ``is_prefill=False`` means every token is a decode token.

    Prefill: ``cu_seqlens`` bounds each prefilled sequence within the prefill part (it starts
    at 0); every such sequence starts at position 0, so its keys are exactly its new tokens.
    Decode: one new token per sequence; keys are read back from the paged cache through
    ``block_tables`` (padded with the null block 0) and masked past ``context_lens``.
    ``block_owner[j]`` is the ``block_tables`` row holding block ``j``, for every block id below
    the largest one in the tables (0 where no decode row holds it): decode attention then reads
    the cache in place. Without ``block_owner`` it gathers each row's blocks instead, which
    keeps every shape a function of the tables' shape alone (what a CUDA graph needs).
    """

    is_prefill: bool
    cu_seqlens: list[int] = field(default_factory=list)  # prefill: len S+1, python ints
    slot_mapping: Optional[torch.Tensor] = None  # [T] flat cache slot (block * block_size + offset)
    block_tables: Optional[torch.Tensor] = None  # decode: [B, max_blocks] block ids
    context_lens: Optional[torch.Tensor] = None  # decode: [B] tokens in cache incl. the new one
    block_owner: Optional[torch.Tensor] = None  # decode: [max block id + 1] row of each block
    num_decode: int = 0  # with is_prefill: how many leading tokens are decode tokens
    block_moves: Optional[torch.Tensor] = None  # [2, M] cache blocks to copy (src, dst) before the step


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even for bf16 activations: bf16 sums of squares lose the small values.
        # One fused reduction (the 2-norm) instead of pow + mean: each full pass over x costs.
        xf = x.float()
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
        return (xf * torch.rsqrt(ms + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim // 2], always fp32 (bf16 angles drift past ~256 positions)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (Meta's layout) of x [T, H, D] by per-token angles cos/sin [T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [T, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` as one complex multiply (Meta's formulation) by ``freqs`` [T, D/2] (complex64)."""
    T, H, D = x.shape
    xc = torch.view_as_complex(x.float().view(T, H, D // 2, 2))
    return torch.view_as_real(xc * freqs[:, None, :]).view(T, H, D).type_as(x)


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN and the inner-product op :func:`linear` calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


#: fp32 matmuls on a CPU through oneDNN (see :func:`linear`); False: PyTorch's BLAS (MKL).
#: A switch for A/B measurements (``bench --cpu-matmul``); off where the build has no oneDNN.
CPU_ONEDNN_LINEAR: bool = onednn_linear_available()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` [T, out] for inference, x [T, in] and weight [out, in].

    fp32 on a CPU goes through oneDNN's inner product rather than ``F.linear`` (MKL's sgemm),
    which runs well below the machine's peak at the few rows of a decode step. On a 2-core EPYC
    the bench model's matmuls took 75 ms instead of 99 at 64 rows, 26 instead of 46 at 16 rows
    (bench/NOTES.md). Same weight tensors: no copy, no packing.
    """
    # Not under torch.compile: inductor picks its own CPU kernels (and lowers this op only for
    # weights it packed itself).
    if (CPU_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and weight.is_contiguous() and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def _all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def _fused_weight(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """The weights of ``module``'s Linears ``names`` stacked into one [sum(out), in] matrix.

    One matmul instead of several: fewer passes and fewer thread fork/joins for the same bytes.
    The parameters are re-pointed at views of the stacked matrix, so memory is not doubled and an
    in-place edit of a parameter (``load_state_dict``, ``mul_``) is seen here. A parameter that
    was replaced since (``Module.to``, ``.data = ...``) makes it rebuild.
    """
    lins = [getattr(module, n) for n in names]
    cached = module.__dict__.get("_fused")
    if cached is not None and torch.compiler.is_compiling():
        # torch.compile cannot trace the pointer check (it would split the graph there). Compiled
        # decode steps only run after eager prefills have built the fused matrix.
        return cached[0]
    if cached is not None and [lin.weight.data_ptr() for lin in lins] == cached[1]:
        return cached[0]
    # A plain tensor even inside inference_mode: the parameters will be views of it.
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([lin.weight for lin in lins])
        off = 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight.data = fused[off:off + n]
            off += n
    module.__dict__["_fused"] = (fused, [lin.weight.data_ptr() for lin in lins])
    return fused


class _Step:
    """Index tensors and scratch space of one forward, derived once from the metadata and shared
    by every layer (masks, RoPE angles and cache addresses are the same in all of them)."""

    def __init__(self, model: "Transformer", positions: torch.Tensor, meta: AttentionMetadata) -> None:
        T, dev = positions.shape[0], positions.device
        attn: Attention = model.layers[0].attention
        self.reuse = not torch.is_grad_enabled()  # scratch reused across layers only without autograd
        self.freqs = model.rope_freqs(dev)[positions]  # [T, D/2] complex
        self.n_decode = meta.num_decode if meta.is_prefill else T
        self.write: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.moves = meta.block_moves if attn.k_cache is not None else None
        if attn.k_cache is not None and meta.slot_mapping is not None:
            bs = attn.k_cache.shape[2]
            self.write = (meta.slot_mapping // bs, meta.slot_mapping % bs)  # (block, offset) of each token
        if self.n_decode:
            self._plan_decode(meta, attn, dev)
        self.seqs = len(meta.cu_seqlens) - 1 if meta.is_prefill else 0
        if self.seqs:
            self._plan_prefill(meta, positions[self.n_decode:], attn, dev)

    def _plan_decode(self, meta: AttentionMetadata, attn: "Attention", dev: torch.device) -> None:
        tables, owner = meta.block_tables, meta.block_owner
        B, W = tables.shape
        bs, G = attn.k_cache.shape[2], attn.n_local_heads // attn.n_local_kv_heads
        span = torch.arange(W * bs, device=dev)
        self.tables, self.owner = tables, owner
        if owner is None:  # gathered: SDPA's boolean mask [B, 1, 1, W * bs], True inside the context
            self.mask = (span < meta.context_lens[:, None]).view(B, 1, 1, W * bs)
            return
        # Additive mask in softmax layout [B, 1, 1, W, bs]: 0 inside the context, -inf past it.
        self.bias = torch.zeros(B, W * bs, device=dev).masked_fill_(span >= meta.context_lens[:, None], float("-inf"))
        self.bias = self.bias.view(B, 1, 1, W, bs)
        self.scores = torch.empty(B, attn.n_local_kv_heads, G, W, bs, device=dev)
        # Per-block probabilities; blocks no row holds stay 0 so their (unused) outputs are finite.
        self.probs = torch.zeros(owner.shape[0], attn.n_local_kv_heads, G, bs, device=dev, dtype=attn.k_cache.dtype)

    def _plan_prefill(self, meta: AttentionMetadata, pos: torch.Tensor, attn: "Attention", dev: torch.device) -> None:
        lens = [e - s for s, e in zip(meta.cu_seqlens[:-1], meta.cu_seqlens[1:])]
        self.max_len = max(lens)
        # Equal lengths (one sequence, or logits_full's batches): the packed tokens are already
        # a [S, L] batch and need no padding.
        self.padded = any(n != self.max_len for n in lens)
        if self.padded:
            seq = torch.repeat_interleave(torch.arange(self.seqs, device=dev), torch.tensor(lens, device=dev),
                                          output_size=len(pos))  # output_size: no device sync
            self.pad_index = seq * self.max_len + pos  # row of each prefill token in the [S * L] layout
            self.pad_width = (attn.n_local_heads + 2 * attn.n_local_kv_heads) * attn.head_dim
            self._pad_buf: Optional[torch.Tensor] = None

    def pad_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """Zeroed [S * L, qkv width]; rows past a sequence's end stay zero (finite keys, masked anyway)."""
        if self._pad_buf is None or not self.reuse:
            self._pad_buf = torch.zeros(self.seqs * self.max_len, self.pad_width, dtype=dtype,
                                        device=self.pad_index.device)
        return self._pad_buf


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int = 1) -> None:
        super().__init__()
        assert args.n_heads % world_size == 0, f"n_heads={args.n_heads} not divisible by tensor_parallel={world_size}"
        self.world_size = world_size
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // world_size
        # GQA with fewer KV heads than ranks: each rank keeps a copy of the one KV head it needs.
        self.n_local_kv_heads = max(1, args.n_kv_heads // world_size)
        self.wq = nn.Linear(args.dim, self.n_local_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_local_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_local_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_local_heads * self.head_dim, args.dim, bias=False)
        # Paged KV cache [num_blocks, n_local_kv_heads, block_size, head_dim]; set by the engine.
        # Block-major, then head: decode attention multiplies whole blocks in place (see _decode).
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        T, Hq, Hkv, D = x.shape[0], self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if torch.is_grad_enabled():  # training: the separate parameters, for their gradients
            qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        else:
            qkv = linear(x, _fused_weight(self, ("wq", "wk", "wv")))
        qk = _rotate(qkv[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D), step.freqs)  # RoPE on q and k at once
        q, k = qk[:, :Hq], qk[:, Hq:]
        v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        if step.moves is not None:  # the block manager renumbered blocks (compaction)
            src, dst = step.moves
            self.k_cache[dst] = self.k_cache[src]
            self.v_cache[dst] = self.v_cache[src]
        if step.write is not None:
            blk, off = step.write
            self.k_cache[blk, :, off] = k
            self.v_cache[blk, :, off] = v

        n = step.n_decode
        outs = []
        if n:
            outs.append(self._decode(q[:n], step) if step.owner is not None else self._decode_gathered(q[:n], step))
        if step.seqs:
            outs.append(self._prefill(qk[n:], v[n:], step))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return _all_reduce(linear(out.reshape(T, Hq * D), self.wo.weight), self.world_size)

    def _prefill(self, qk: torch.Tensor, v: torch.Tensor, step: _Step) -> torch.Tensor:
        """Causal attention within each prefilled sequence: one SDPA over a [S, L] batch.

        ``qk`` [T, Hq + Hkv, D] holds the rotated queries then keys of the prefill tokens.
        """
        S, L, Hq, Hkv, D = step.seqs, step.max_len, self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if step.padded:
            # Right-padded, so causality alone keeps real queries off the padding keys. Two row
            # copies into column ranges: a torch.cat of q|k|v first took ~10 ms a layer at 2k tokens.
            buf = step.pad_buffer(qk.dtype)
            buf[:, :(Hq + Hkv) * D].index_copy_(0, step.pad_index, qk.flatten(1))
            buf[:, (Hq + Hkv) * D:].index_copy_(0, step.pad_index, v.flatten(1))
            rows = buf.view(S, L, -1)
            q = rows[..., :Hq * D].view(S, L, Hq, D)
            k = rows[..., Hq * D:(Hq + Hkv) * D].view(S, L, Hkv, D)
            v = rows[..., (Hq + Hkv) * D:].view(S, L, Hkv, D)
        else:
            q, k, v = qk[:, :Hq].reshape(S, L, Hq, D), qk[:, Hq:].reshape(S, L, Hkv, D), v.reshape(S, L, Hkv, D)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=Hq != Hkv)  # [S, Hq, L, D]
        o = o.transpose(1, 2).reshape(S * L, Hq, D)
        return o[step.pad_index] if step.padded else o

    def _decode(self, q: torch.Tensor, step: _Step) -> torch.Tensor:
        """One query per sequence against its paged context, reading the cache in place.

        Gathering each sequence's blocks into a dense [B, context] copy (what SDPA needs) would
        move every cached byte twice more per layer. Instead every block in use is multiplied
        with the query of the row that owns it, then a softmax runs over each row's blocks.
        """
        B, Hq, Hkv, D = q.shape[0], self.n_local_heads, self.n_local_kv_heads, self.head_dim
        G, hi = Hq // Hkv, step.owner.shape[0]
        kc, vc = self.k_cache[:hi], self.v_cache[:hi]  # [hi, Hkv, bs, D]
        qb = q.reshape(B, Hkv, G, D)[step.owner]  # [hi, Hkv, G, D]: each block's query
        s = torch.matmul(qb, kc.transpose(-1, -2))  # [hi, Hkv, G, bs]
        scores = step.scores if step.reuse else torch.empty_like(step.scores)
        torch.add(step.bias, s[step.tables].permute(0, 2, 3, 1, 4), alpha=D ** -0.5, out=scores)
        W, bs = scores.shape[-2:]
        p = torch.softmax(scores.view(B, Hkv, G, W * bs), dim=-1).to(kc.dtype)
        probs = step.probs if step.reuse else step.probs.clone()
        # Padding entries all point at the null block 0 and carry probability 0.
        probs[step.tables] = p.view(B, Hkv, G, W, bs).permute(0, 3, 1, 2, 4)
        ob = torch.matmul(probs, vc)  # [hi, Hkv, G, D]: each block's share of its row's output
        return ob[step.tables].sum(1).view(B, Hq, D)

    def _decode_gathered(self, q: torch.Tensor, step: _Step) -> torch.Tensor:
        """:meth:`_decode` by gathering each row's blocks into a dense [B, Hkv, W * bs, D] copy.

        More bytes moved than in place, but no shape depends on the blocks' ids: this is the
        decode attention that CUDA graphs replay (``batchgen.engine.graphs``).
        """
        B, Hq, Hkv, D = q.shape[0], self.n_local_heads, self.n_local_kv_heads, self.head_dim
        W, bs = step.tables.shape[1], self.k_cache.shape[2]
        # [B, W, Hkv, bs, D] -> [B, Hkv, W * bs, D]: each row's context, block after block
        k = self.k_cache[step.tables].transpose(1, 2).reshape(B, Hkv, W * bs, D)
        v = self.v_cache[step.tables].transpose(1, 2).reshape(B, Hkv, W * bs, D)
        o = F.scaled_dot_product_attention(q.view(B, Hq, 1, D), k, v, attn_mask=step.mask,
                                           enable_gqa=Hq != Hkv)  # [B, Hq, 1, D]
        return o.view(B, Hq, D)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int = 1) -> None:
        super().__init__()
        assert args.hidden_dim % world_size == 0, f"FFN width {args.hidden_dim} not divisible by tensor_parallel={world_size}"
        self.world_size = world_size
        hidden = args.hidden_dim // world_size
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _all_reduce(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.world_size)
        h = linear(x, _fused_weight(self, ("w1", "w3")))  # [T, 2 * hidden]
        n = h.shape[-1] // 2
        gate = F.silu(h[:, :n]).mul_(h[:, n:])  # [T, hidden], contiguous: oneDNN would copy a view
        return _all_reduce(linear(gate, self.w2.weight), self.world_size)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int = 1) -> None:
        super().__init__()
        self.attention = Attention(args, world_size)
        self.feed_forward = FeedForward(args, world_size)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA decoder. ``world_size``/``rank`` select this rank's tensor-parallel slice."""

    def __init__(self, args: ModelArgs, world_size: int = 1, rank: int = 0) -> None:
        super().__init__()
        self.args = args
        self.world_size = world_size
        self.rank = rank
        # Embeddings and the output head stay whole on every rank: they are < 2% of a 70B
        # model, and keeping them whole saves two collectives per step.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, world_size) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Plain attributes, not buffers: Module.to(bfloat16) would otherwise cast the tables.
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # cos, sin, complex

    def set_max_seq_len(self, n: int) -> None:
        """Serve contexts of up to ``n`` tokens. RoPE is computed, not learned, so only its tables
        change. ``args`` is replaced, not edited: the caller's ``ModelArgs`` may be shared."""
        if n != self.args.max_seq_len:
            self.args = replace(self.args, max_seq_len=n)
            self._rope = None

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [max_seq_len, head_dim // 2] (fp32) on ``device``."""
        if self._rope is None or self._rope[0].device != device:
            cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
            self._rope = (cos, sin, torch.complex(cos, sin))
        return self._rope[0], self._rope[1]

    def rope_freqs(self, device: torch.device) -> torch.Tensor:
        """The same angles as unit complex numbers [max_seq_len, head_dim // 2] (complex64)."""
        self.rope(device)
        return self._rope[2]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, dim] of the packed tokens [T] at positions [T] (before the final norm)."""
        step = _Step(self, positions, meta)
        h = self.tok_embeddings(tokens)  # [T, dim]
        for layer in self.layers:
            h = layer(h, step)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in fp32 for hidden states [N, dim]."""
        return linear(self.norm(h), self.output.weight).float()

    def logits_full(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] for a batch of equal-length sequences [B, L], no KV cache.

        The reference path for tests and training: every position, starting at position 0.
        """
        B, L = tokens.shape
        positions = torch.arange(L, device=tokens.device).repeat(B)
        meta = AttentionMetadata(is_prefill=True, cu_seqlens=[i * L for i in range(B + 1)])
        saved = [(layer.attention.k_cache, layer.attention.v_cache) for layer in self.layers]
        for layer in self.layers:
            layer.attention.k_cache = layer.attention.v_cache = None
        try:
            h = self.forward(tokens.reshape(-1), positions, meta)
        finally:
            for layer, (kc, vc) in zip(self.layers, saved):
                layer.attention.k_cache, layer.attention.v_cache = kc, vc
        return self.compute_logits(h).view(B, L, -1)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips ``torch.nn.init``'s initialisers, which have nothing to fill on the meta device."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(args: ModelArgs, world_size: int = 1, rank: int = 0) -> Transformer:
    """The model's modules and shapes on the meta device: no memory, no initialisation.

    Initialising on meta would be a no-op, but ``normal_`` (the embedding's) goes through
    ``torch._refs`` there, whose first use imports ``torch._dynamo``: about a second of every
    process that loads a checkpoint (each replica's start), for nothing.
    """
    with torch.device("meta"), _SkipInit():
        return Transformer(args, world_size, rank)


def count_parameters(args: ModelArgs) -> int:
    """Parameter count of a model with these args, built on the meta device (no memory used)."""
    return sum(p.numel() for p in meta_model(args).parameters())


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """Map ``auto``/``float32``/``bfloat16``/``float16`` to a torch dtype for ``device``."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if dev.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def param_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of weights for these args in ``dtype`` (tied output counted once)."""
    return count_parameters(args) * torch.finfo(dtype).bits // 8


__all__ = [
    "ModelArgs", "PRESETS", "AttentionMetadata", "Transformer", "RMSNorm", "Attention",
    "FeedForward", "TransformerBlock", "ffn_hidden_dim", "count_parameters", "resolve_dtype",
    "default_device", "param_bytes", "rope_tables", "apply_rope", "linear", "onednn_linear_available",
]
