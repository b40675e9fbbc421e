"""The LLaMA decoder, in one file.

Module and parameter names equal Meta's checkpoint keys (``tok_embeddings``,
``layers.N.attention.wq``, ``feed_forward.w1`` ...), so a ``consolidated.*.pth`` state dict loads
with no key map. Hugging Face checkpoints are mapped onto these names by ``batchgen.checkpoint``.

The forward pass works on a *packed* batch: the new tokens of every sequence in the step are
concatenated into one ``[T]`` vector, so the linear layers never compute on padding. Attention
is the only part that needs to know where one sequence ends and the next begins; it reads that
from an :class:`AttentionMetadata` the engine builds (or, with no KV cache, from ``cu_seqlens``).

Tensor parallelism (Megatron style) is built in: with ``world_size > 1`` each rank holds
``1/world_size`` of the heads and of the FFN, and the row-parallel projections (``wo``, ``w2``)
all-reduce their output. With ``world_size == 1`` no ``torch.distributed`` call is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

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

    Prefill steps: ``cu_seqlens`` bounds each sequence's new tokens in the packed batch; every
    sequence starts at position 0, so its keys are exactly its new tokens.
    Decode steps: one new token per sequence; keys are read back from the paged cache through
    ``block_tables`` and masked past ``context_lens``.
    """

    is_prefill: bool
    cu_seqlens: list[int] = field(default_factory=list)  # prefill: len B+1, python ints
    slot_mapping: Optional[torch.Tensor] = None  # [T] flat cache slot of each new token
    block_tables: Optional[torch.Tensor] = None  # decode: [B, max_blocks] block ids
    context_lens: Optional[torch.Tensor] = None  # decode: [B] tokens in cache incl. the new one
    decode_mask: Optional[torch.Tensor] = None  # decode: [B, 1, 1, max_blocks*block_size] bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even for bf16 activations: bf16 sums of squares lose the small values.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


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


def _all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


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
        # Paged KV cache [num_blocks, block_size, n_local_kv_heads, head_dim]; set by the engine.
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(T, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.k_cache is not None and meta.slot_mapping is not None:
            self.k_cache.view(-1, self.n_local_kv_heads, self.head_dim)[meta.slot_mapping] = k
            self.v_cache.view(-1, self.n_local_kv_heads, self.head_dim)[meta.slot_mapping] = v

        gqa = self.n_local_heads != self.n_local_kv_heads
        if meta.is_prefill:
            # One causal SDPA per sequence: a packed block-diagonal mask would cost T^2 memory.
            outs = []
            for s, e in zip(meta.cu_seqlens[:-1], meta.cu_seqlens[1:]):
                qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
                outs.append(o[0].transpose(0, 1))  # [L, H, D]
            out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        else:
            B = T
            kc = self.k_cache[meta.block_tables].flatten(1, 2)  # [B, max_blocks*block_size, Hkv, D]
            vc = self.v_cache[meta.block_tables].flatten(1, 2)
            o = F.scaled_dot_product_attention(
                q.view(B, self.n_local_heads, 1, self.head_dim),
                kc.transpose(1, 2), vc.transpose(1, 2),
                attn_mask=meta.decode_mask, enable_gqa=gqa,
            )  # [B, H, 1, D]
            out = o.view(B, self.n_local_heads, self.head_dim)
        return _all_reduce(self.wo(out.reshape(T, -1)), self.world_size)


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
        return _all_reduce(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.world_size)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int = 1) -> None:
        super().__init__()
        self.attention = Attention(args, world_size)
        self.feed_forward = FeedForward(args, world_size)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, meta)
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
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
        return self._rope

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, dim] of the packed tokens [T] at positions [T] (before the final norm)."""
        cos_t, sin_t = self.rope(tokens.device)
        cos, sin = cos_t[positions], sin_t[positions]  # [T, head_dim/2]
        h = self.tok_embeddings(tokens)  # [T, dim]
        for layer in self.layers:
            h = layer(h, cos, sin, meta)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in fp32 for hidden states [N, dim]."""
        return self.output(self.norm(h)).float()

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


def count_parameters(args: ModelArgs) -> int:
    """Parameter count of a model with these args, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Transformer(args)
    return sum(p.numel() for p in model.parameters())


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
    "default_device", "param_bytes", "rope_tables", "apply_rope",
]
