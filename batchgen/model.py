"""The LLaMA decoder, in one file.

Module and parameter names follow Meta's checkpoint keys (``tok_embeddings``,
``layers.N.attention.wo``, ``feed_forward.w2`` ...), except that q/k/v and w1/w3 are stored
fused, as gpt-fast does: ``attention.wqkv`` holds ``wq``, ``wk``, ``wv`` stacked by rows and
``feed_forward.w13`` holds ``w1``, ``w3``, so each runs as one matmul. ``batchgen.checkpoint``
fuses Meta and Hugging Face checkpoints at load and splits them again when saving;
:meth:`Attention.fused_rows` and :meth:`FeedForward.fused_rows` say which rows are which.

The forward pass works on tokens flattened to one ``[T]`` vector, so the linear layers never
compute on padding. Attention is the only part that needs to know where one sequence ends and
the next begins: each layer computes its projections and RoPE and hands q, k and v to an
attention backend (:class:`AttentionBackend`) given by the caller. The engine hands in one that
reads and writes its paged KV cache (``batchgen.engine.attention``); without one (training, a
plain forward) the model runs causal attention over a ``[B, L]`` batch.

Tensor parallelism (Megatron style) is built in: with ``world_size > 1`` each rank holds
``1/world_size`` of the heads and of the FFN, and the row-parallel projections (``wo``, ``w2``)
all-reduce their output. With ``world_size == 1`` no ``torch.distributed`` call is made.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from batchgen.ops import linear


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


class AttentionBackend(Protocol):
    """Attention of one layer over one forward's tokens, called as ``attn(layer_id, q, k, v)``.

    q [T, Hq, D] and k, v [T, Hkv, D] are this rank's heads of the forward's T tokens, RoPE
    already applied to q and k; returns the attention output [T, Hq, D]. The backend knows where
    each sequence begins and ends, and keeps whatever K/V cache it needs.
    """

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class LoraHook(Protocol):
    """Per-row low-rank updates of one forward, called as ``lora(layer_id, proj, x, out)``.

    ``proj`` is one of the model's matmuls (``wqkv``, ``wo``, ``w13``, ``w2``; the fused ones
    stacked in :meth:`Attention.fused_rows` / :meth:`FeedForward.fused_rows` order), ``x`` [T, in]
    its input and ``out`` [T, out] the base matmul's output for all rows (this rank's slice,
    before any all-reduce); the hook adds each row's adapter update into ``out`` in place. The
    caller (the engine) knows which adapter each row uses; the model only says where.
    """

    def __call__(self, layer_id: int, proj: str, x: torch.Tensor, out: torch.Tensor) -> None: ...


class CausalAttention:
    """The backend without a cache: ``batch`` equal-length sequences, each attending causally to
    itself (tokens [B * L], sequence after sequence)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, (T, Hq, D), Hkv = self.batch, q.shape, k.shape[1]
        q, k, v = (t.reshape(B, T // B, -1, D).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)  # [B, Hq, L, D]
        return o.transpose(1, 2).reshape(T, Hq, D)


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


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (Meta's layout) of x [T, H, D] by unit complex numbers
    ``freqs`` [T, D/2] (complex64): one complex multiply, Meta's formulation."""
    T, H, D = x.shape
    xc = torch.view_as_complex(x.float().view(T, H, D // 2, 2))
    return torch.view_as_real(xc * freqs[:, None, :]).view(T, H, D).type_as(x)


def _all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def _row_ranges(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``{name: rows}`` stacked in order → ``{name: (start, stop)}``."""
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = (start, start + n)
        start += n
    return out


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, world_size: int = 1) -> None:
        super().__init__()
        assert args.n_heads % world_size == 0, f"n_heads={args.n_heads} not divisible by tensor_parallel={world_size}"
        self.layer_id = layer_id
        self.world_size = world_size
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // world_size
        # GQA with fewer KV heads than ranks: each rank keeps a copy of the one KV head it needs.
        self.n_local_kv_heads = max(1, args.n_kv_heads // world_size)
        q, kv = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
        self.wqkv = nn.Linear(args.dim, q + 2 * kv, bias=False)  # wq | wk | wv
        self.wo = nn.Linear(q, args.dim, bias=False)

    def fused_rows(self) -> dict[str, tuple[int, int]]:
        """Rows ``(start, stop)`` of ``wq``, ``wk`` and ``wv`` inside ``wqkv`` (this rank's slices)."""
        q, kv = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
        return _row_ranges({"wq": q, "wk": kv, "wv": kv})

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, attn: AttentionBackend,
                lora: Optional[LoraHook] = None) -> torch.Tensor:
        """x [T, dim], freqs [T, D/2] (complex) → [T, dim]."""
        T, Hq, Hkv, D = x.shape[0], self.n_local_heads, self.n_local_kv_heads, self.head_dim
        qkv = linear(x, self.wqkv.weight)  # [T, (Hq + 2 * Hkv) * D]
        if lora is not None:
            lora(self.layer_id, "wqkv", x, qkv)
        qk = apply_rotary(qkv[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D), freqs)  # RoPE on q and k at once
        v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        out = attn(self.layer_id, qk[:, :Hq], qk[:, Hq:], v).reshape(T, Hq * D)  # [T, Hq * D]
        o = linear(out, self.wo.weight)
        if lora is not None:  # a row-parallel rank's partial update: before the all-reduce sums them
            lora(self.layer_id, "wo", out, o)
        return _all_reduce(o, self.world_size)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int = 1, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id
        assert args.hidden_dim % world_size == 0, f"FFN width {args.hidden_dim} not divisible by tensor_parallel={world_size}"
        self.world_size = world_size
        self.hidden = args.hidden_dim // world_size
        # Drawn as Meta's w1, w2, w3, in that order: a seed gives the same model as unfused code.
        w1, w2, w3 = (nn.Linear(i, o, bias=False) for i, o in
                      ((args.dim, self.hidden), (self.hidden, args.dim), (args.dim, self.hidden)))
        self.w13 = nn.Linear(args.dim, 2 * self.hidden, bias=False, device="meta")  # w1 (gate) | w3 (up)
        if not w1.weight.is_meta:  # (on meta, cat would import torch._dynamo: see empty_model)
            self.w13.weight = nn.Parameter(torch.cat([w1.weight, w3.weight]).detach())
        self.w2 = w2

    def fused_rows(self) -> dict[str, tuple[int, int]]:
        """Rows ``(start, stop)`` of ``w1`` and ``w3`` inside ``w13`` (this rank's slices)."""
        return _row_ranges({"w1": self.hidden, "w3": self.hidden})

    def forward(self, x: torch.Tensor, lora: Optional[LoraHook] = None) -> torch.Tensor:
        """x [T, dim] → [T, dim]."""
        h = linear(x, self.w13.weight)  # [T, 2 * hidden]
        if lora is not None:
            lora(self.layer_id, "w13", x, h)
        gate = F.silu(h[:, :self.hidden]).mul_(h[:, self.hidden:])  # [T, hidden], contiguous: oneDNN would copy a view
        o = linear(gate, self.w2.weight)
        if lora is not None:
            lora(self.layer_id, "w2", gate, o)
        return _all_reduce(o, self.world_size)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, world_size: int = 1) -> None:
        super().__init__()
        self.attention = Attention(layer_id, args, world_size)
        self.feed_forward = FeedForward(args, world_size, layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, attn: AttentionBackend,
                lora: Optional[LoraHook] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, attn, lora)
        return h + self.feed_forward(self.ffn_norm(h), lora)


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
        self.layers = nn.ModuleList(TransformerBlock(i, args, world_size) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # A plain attribute, not a buffer: Module.to(bfloat16) would otherwise cast the table.
        self._freqs: Optional[torch.Tensor] = None

    def set_max_seq_len(self, n: int) -> None:
        """Serve contexts of up to ``n`` tokens. RoPE is computed, not learned, so only its table
        changes. ``args`` is replaced, not edited: the caller's ``ModelArgs`` may be shared."""
        if n != self.args.max_seq_len:
            self.args = replace(self.args, max_seq_len=n)
            self._freqs = None

    def rope_freqs(self, device: torch.device) -> torch.Tensor:
        """RoPE angles as unit complex numbers [max_seq_len, head_dim // 2] (complex64) on ``device``."""
        if self._freqs is None or self._freqs.device != device:
            cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
            self._freqs = torch.complex(cos, sin)
        return self._freqs

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attn: Optional[AttentionBackend] = None, lora: Optional[LoraHook] = None) -> torch.Tensor:
        """Hidden states (before the final norm) of ``tokens``, shaped ``tokens.shape + (dim,)``.

        With a backend: packed tokens [T] at ``positions`` [T], attention as the backend says.
        Without: a batch [B, L] of equal-length sequences, each starting at position 0 unless
        ``positions`` [B, L] says otherwise, attending causally within itself. ``lora`` adds
        unmerged adapters' per-row updates to the projections (see :class:`LoraHook`).
        """
        if attn is None:
            if tokens.dim() != 2:
                raise ValueError("without an attention backend tokens must be a [B, L] batch, "
                                 f"got {tuple(tokens.shape)}")
            attn = CausalAttention(tokens.shape[0])
            if positions is None:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        freqs = self.rope_freqs(tokens.device)[positions.reshape(-1)]  # [T, D/2]
        h = self.tok_embeddings(tokens.reshape(-1))  # [T, dim]
        for layer in self.layers:
            h = layer(h, freqs, attn, lora)
        return h.view(*tokens.shape, -1)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] in fp32 for hidden states [..., dim]."""
        return linear(self.norm(h).flatten(0, -2), self.output.weight).float().view(*h.shape[:-1], -1)

    def logits_full(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] for a batch of equal-length sequences [B, L] from position 0, no cache."""
        return self.compute_logits(self.forward(tokens))


#: The fused weights of a layer and the checkpoint tensors stacked in them, in row order.
FUSED_WEIGHTS = {"attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
                 "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}


def _leaf(name: str) -> tuple[str, str]:
    """``layers.3.attention.wq.weight`` → (``layers.3.``, ``attention.wq.weight``)."""
    parts = name.split(".", 2)
    return (f"{parts[0]}.{parts[1]}.", parts[2]) if parts[0] == "layers" and len(parts) == 3 else ("", name)


def fuse_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with Meta's separate ``wq``/``wk``/``wv`` and ``w1``/``w3`` (of any one
    tensor-parallel slice) → the model's, with each group concatenated into its fused weight."""
    out = dict(state_dict)
    for name in state_dict:
        prefix, leaf = _leaf(name)
        for fused, parts in FUSED_WEIGHTS.items():
            if leaf == parts[0]:
                out[prefix + fused] = torch.cat([out.pop(prefix + p) for p in parts])
    return out


def split_fused_weights(state_dict: dict[str, torch.Tensor], args: ModelArgs,
                        world_size: int = 1) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fuse_weights` for the state dict of a model of ``args`` (a rank's
    slice with ``world_size > 1``): each fused weight becomes views of its pieces; other entries
    stay as they are."""
    layer = empty_model(replace(args, n_layers=1), world_size).layers[0]
    rows = {"attention.wqkv.weight": layer.attention.fused_rows(),
            "feed_forward.w13.weight": layer.feed_forward.fused_rows()}
    out = {}
    for name, t in state_dict.items():
        prefix, leaf = _leaf(name)
        if leaf not in FUSED_WEIGHTS:
            out[name] = t
            continue
        for part, (start, stop) in zip(FUSED_WEIGHTS[leaf], rows[leaf].values()):
            out[prefix + part] = t[start:stop]
    return out


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips ``torch.nn.init``'s initialisers, which have nothing to fill on the meta device."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def empty_model(args: ModelArgs, world_size: int = 1, rank: int = 0) -> Transformer:
    """The model's modules and shapes on the meta device: no memory, no initialisation.

    Initialising on meta would be a no-op, but ``normal_`` (the embedding's) goes through
    ``torch._refs`` there, whose first use imports ``torch._dynamo``: about a second of every
    process that loads a checkpoint (each replica's start), for nothing.
    """
    with torch.device("meta"), _SkipInit():
        return Transformer(args, world_size, rank)


def count_parameters(args: ModelArgs) -> int:
    """Parameter count of a model with these args, built on the meta device (no memory used)."""
    return sum(p.numel() for p in empty_model(args).parameters())


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


__all__ = [
    "ModelArgs", "PRESETS", "AttentionBackend", "LoraHook", "CausalAttention", "Transformer", "RMSNorm", "Attention",
    "FeedForward", "TransformerBlock", "ffn_hidden_dim", "count_parameters", "resolve_dtype",
    "default_device", "empty_model", "rope_tables", "apply_rotary", "FUSED_WEIGHTS", "fuse_weights",
    "split_fused_weights",
]
