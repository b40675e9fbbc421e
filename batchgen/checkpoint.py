"""Load and save LLaMA checkpoints in Meta's layout and in Hugging Face's layout.

Meta layout: ``params.json`` + ``consolidated.00.pth … consolidated.NN.pth``, one file per
model-parallel rank of Meta's reference code. Hugging Face layout: ``config.json`` +
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), with HF's names
and HF's rotate-half ordering of the q/k rows, which is undone here so both layouts feed the
same :class:`~batchgen.model.Transformer`. Checkpoints keep q/k/v and w1/w3 as separate
tensors; the model holds them fused (``wqkv``, ``w13``): loading slices each projection for its
tensor-parallel rank, then concatenates, and the writers split them again.

Loading never materialises a second copy of the weights: the model is built on the meta device,
``.pth`` files are memory-mapped, safetensors are read slice by slice, and the tensors are
*assigned* into the model rather than copied into pre-allocated parameters (the fused ones are
the one copy made, replacing their pieces). A tensor-parallel
rank reads only its own slice of each matrix.

Only ``torch.load(weights_only=True)`` is ever used: a checkpoint is data, not code. The
writers (``save_meta``, ``save_hf``) are in ``batchgen.checkpoint_save``.
"""

from __future__ import annotations

import json
import pickle
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence

import torch
from safetensors import safe_open

from batchgen.limits import shape_problem
from batchgen.model import (ModelArgs, Transformer, default_device, empty_model, fuse_weights,
                            resolve_dtype, split_fused_weights)

if TYPE_CHECKING:
    from batchgen.lora import LoraAdapter

Layout = Literal["meta", "hf"]
# ``Layout`` "meta" is Meta's file layout; the meta *device* appears only as ``empty_model``.
# (dim, start, stop): the part of a full tensor one tensor-parallel rank holds.
Slice = tuple[int, int, int]

_META_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_HF_INDEX = "model.safetensors.index.json"

# Dims along which Meta's model-parallel files split each tensor; anything else is replicated.
_MP_DIM0 = {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
            "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight"}
_MP_DIM1 = {"attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight"}
# Meta files carry the RoPE table; the model recomputes it.
_META_IGNORED = {"rope.freqs"}

_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TO_HF_TOP = {v: k for k, v in _HF_TOP.items()}
_TO_HF_LAYER = {v: k for k, v in _HF_LAYER.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed or does not match its config."""


# ---------------------------------------------------------------------------------------------
# Layout and config
# ---------------------------------------------------------------------------------------------


def detect_layout(model_dir: str | Path) -> Layout:
    """``"meta"`` for params.json + consolidated.*.pth, ``"hf"`` for config.json + *.safetensors."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory; expected a model checkpoint directory")
    has_params, has_config = (d / "params.json").is_file(), (d / "config.json").is_file()
    has_pth = bool(_meta_shard_files(d, check=False))
    has_st = any(d.glob("*.safetensors")) or (d / _HF_INDEX).is_file()
    if has_params and has_pth:
        return "meta"
    if has_config and has_st:
        return "hf"
    if has_params:
        raise CheckpointError(f"{d}: params.json found but no consolidated.NN.pth weight files")
    if has_config:
        raise CheckpointError(f"{d}: config.json found but no model.safetensors or {_HF_INDEX} "
                              "(only safetensors weights are supported in the Hugging Face layout)")
    if has_pth:
        raise CheckpointError(f"{d}: consolidated.*.pth weight files found but params.json is missing")
    if has_st:
        raise CheckpointError(f"{d}: *.safetensors weight files found but config.json is missing")
    raise CheckpointError(f"{d}: no model checkpoint; expected params.json + consolidated.*.pth "
                          "(Meta layout) or config.json + *.safetensors (Hugging Face layout)")


def load_args(model_dir: str | Path) -> ModelArgs:
    """Model shape from ``params.json`` (Meta) or ``config.json`` (Hugging Face)."""
    d = Path(model_dir)
    return _meta_args(d) if detect_layout(d) == "meta" else _hf_args(d)


_REQUIRED = object()


def _field(cfg: dict, key: str, typ: type, path: Path, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` checked to be of ``typ`` (ints accepted as floats; bools never pass as ints)."""
    if cfg.get(key) is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: missing required field {key!r}")
        return default
    v = cfg[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise CheckpointError(f"{path}: field {key!r} must be {typ.__name__}, got {v!r}")
    return v


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _make_args(path: Path, **kw: Any) -> ModelArgs:
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
        if kw.get(k) is not None and kw[k] <= 0:
            raise CheckpointError(f"{path}: {k} must be positive, got {kw[k]}")
    try:
        args = ModelArgs(**kw)
    except ValueError as e:  # ModelArgs checks head divisibility
        raise CheckpointError(f"{path}: {e}") from e
    if (why := shape_problem(args, hf=path.name == "config.json")) is not None:  # before anything is built
        raise CheckpointError(f"{path}: {why}")
    return args


def recorded_context(model_dir: str | Path) -> Optional[int]:
    """The context length a checkpoint's config records (HF ``max_position_embeddings``, a
    ``max_seq_len`` in ``params.json``), or None where it records none (Meta's own files).
    Call after :func:`load_args` has checked the config."""
    d = Path(model_dir)
    meta = detect_layout(d) == "meta"
    cfg = _read_json(d / ("params.json" if meta else "config.json"))
    value = cfg.get("max_seq_len" if meta else "max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _meta_args(d: Path) -> ModelArgs:
    path = d / "params.json"
    p = _read_json(path)
    if p.get("use_scaled_rope"):
        raise CheckpointError(f"{path}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    vocab = _field(p, "vocab_size", int, path, -1)
    if vocab == -1:
        # LLaMA-1 files leave the vocabulary to the tokenizer; the embedding knows it.
        first = _meta_shard_files(d)[0]
        emb = _torch_load(first).get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise CheckpointError(f"{first}: vocab_size is -1 in params.json and "
                                  "tok_embeddings.weight is missing or not 2-D")
        vocab = emb.shape[0]
    return _make_args(
        path, dim=_field(p, "dim", int, path), n_layers=_field(p, "n_layers", int, path),
        n_heads=_field(p, "n_heads", int, path), n_kv_heads=_field(p, "n_kv_heads", int, path, None),
        vocab_size=vocab, multiple_of=_field(p, "multiple_of", int, path, 256),
        ffn_dim_multiplier=_field(p, "ffn_dim_multiplier", float, path, None),
        norm_eps=_field(p, "norm_eps", float, path, 1e-5),
        rope_theta=_field(p, "rope_theta", float, path, 10000.0),
        max_seq_len=_field(p, "max_seq_len", int, path, 2048),
    )


def _hf_args(d: Path) -> ModelArgs:
    path = d / "config.json"
    c = _read_json(path)
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type is {c.get('model_type')!r}; only 'llama' is supported")
    if c.get("rope_scaling"):
        raise CheckpointError(f"{path}: rope_scaling {c['rope_scaling']!r} is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if _field(c, flag, bool, path, False):
            raise CheckpointError(f"{path}: {flag}=true is not supported (LLaMA has no biases)")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {c['hidden_act']!r} is not supported; only 'silu'")
    theta = _field(c, "rope_theta", float, path, 10000.0)
    # transformers >= 5 writes rope_parameters instead of a top-level rope_theta.
    rope = c.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            raise CheckpointError(f"{path}: rope_parameters must be an object, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{path}: rope_parameters type {kind!r} (RoPE scaling) is not supported")
        theta = _field(rope, "rope_theta", float, path, theta)
    dim, heads = _field(c, "hidden_size", int, path), _field(c, "num_attention_heads", int, path)
    head_dim = _field(c, "head_dim", int, path, None)
    if head_dim is not None and heads > 0 and head_dim * heads != dim:
        raise CheckpointError(f"{path}: head_dim={head_dim} is not hidden_size/num_attention_heads "
                              f"= {dim}/{heads}; that shape is not supported")
    return _make_args(
        path, dim=dim, n_layers=_field(c, "num_hidden_layers", int, path), n_heads=heads,
        n_kv_heads=_field(c, "num_key_value_heads", int, path, None),
        vocab_size=_field(c, "vocab_size", int, path),
        hidden_dim=_field(c, "intermediate_size", int, path),
        norm_eps=_field(c, "rms_norm_eps", float, path, 1e-6), rope_theta=theta,
        max_seq_len=_field(c, "max_position_embeddings", int, path, 2048),
        tie_word_embeddings=_field(c, "tie_word_embeddings", bool, path, False),
    )


# ---------------------------------------------------------------------------------------------
# Tensor sources: every checkpoint key as (file, full shape, slice reader)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One model tensor in a checkpoint, readable whole or as a tensor-parallel slice."""

    source: str  # file(s) and on-disk key, for error messages
    shape: tuple[int, ...]  # full shape (Meta model-parallel files merged)
    read: Callable[[Optional[Slice]], torch.Tensor]


def _leaf(name: str) -> str:
    """``layers.3.attention.wq.weight`` → ``attention.wq.weight``; top-level names unchanged."""
    return name.split(".", 2)[2] if name.startswith("layers.") and name.count(".") >= 2 else name


def _mp_dim(name: str) -> Optional[int]:
    leaf = _leaf(name)
    return 0 if leaf in _MP_DIM0 else 1 if leaf in _MP_DIM1 else None


def _meta_shard_files(d: Path, check: bool = True) -> list[Path]:
    """``consolidated.NN.pth`` files in rank order; with ``check``, they must be 00..N-1."""
    found = sorted(((int(m.group(1)), p) for p in d.glob("consolidated.*.pth")
                    if (m := _META_SHARD_RE.match(p.name))), key=lambda t: t[0])
    if check:
        if not found:
            raise CheckpointError(f"{d}: no consolidated.NN.pth weight files")
        idx = [i for i, _ in found]
        if idx != list(range(len(found))):
            raise CheckpointError(f"{d}: consolidated.*.pth files are numbered {idx}; "
                                  f"expected 00 to {len(found) - 1:02d} with no gaps")
    return [p for _, p in found]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` dict from a ``.pth`` file, memory-mapped, tensors only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"{path}: refused: the file holds Python objects other than tensors, and "
                              f"checkpoints are only loaded with weights_only=True. {why}".strip()) from e
    except Exception as e:  # torch raises RuntimeError/OSError/EOFError/... for damaged archives
        raise CheckpointError(f"{path}: cannot read checkpoint; truncated or corrupt? ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


def _gather(tensors: list[torch.Tensor], dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` along ``dim`` of the concatenation of ``tensors``, touching only the
    pieces that overlap (the others stay unread on disk)."""
    parts, off = [], 0
    for t in tensors:
        n = t.shape[dim]
        lo, hi = max(start, off), min(stop, off + n)
        if lo < hi:
            parts.append(t.narrow(dim, lo - off, hi - lo))
        off += n
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _meta_entries(d: Path) -> dict[str, _Entry]:
    files = _meta_shard_files(d)
    shards = [_torch_load(f) for f in files]
    keys = set(shards[0]) - _META_IGNORED
    for f, s in zip(files[1:], shards[1:]):
        diff = keys ^ (set(s) - _META_IGNORED)
        if diff:
            raise CheckpointError(f"{f}: keys differ from {files[0].name}: {sorted(diff)[:5]}")
    label = str(files[0]) if len(files) == 1 else f"{d}/consolidated.{{00..{len(files) - 1:02d}}}.pth"
    entries = {}
    for k in sorted(keys):
        ts = [s[k] for s in shards]
        mp = _mp_dim(k) if len(ts) > 1 else None
        shape = list(ts[0].shape)
        if mp is not None:
            if ts[0].dim() <= mp or any(t.shape[:mp] + t.shape[mp + 1:] != ts[0].shape[:mp] + ts[0].shape[mp + 1:]
                                        for t in ts):
                raise CheckpointError(f"{label}: key {k!r} has inconsistent shard shapes "
                                      f"{[tuple(t.shape) for t in ts]} (split along dim {mp})")
            shape[mp] = sum(t.shape[mp] for t in ts)
        entries[k] = _Entry(f"{label} key {k!r}", tuple(shape), _meta_reader(ts, mp))
    return entries


def _meta_reader(ts: list[torch.Tensor], mp: Optional[int]) -> Callable[[Optional[Slice]], torch.Tensor]:
    def read(sl: Optional[Slice]) -> torch.Tensor:
        if mp is None:  # one file, or replicated across files (norms): shard 0 is the tensor
            return ts[0] if sl is None else ts[0].narrow(sl[0], sl[1], sl[2] - sl[1])
        if sl is None:
            return torch.cat(ts, mp)
        if sl[0] == mp:
            return _gather(ts, *sl)
        return torch.cat(ts, mp).narrow(sl[0], sl[1], sl[2] - sl[1])
    return read


def _from_hf_name(name: str) -> Optional[str]:
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def _to_hf_name(name: str) -> str:
    if name in _TO_HF_TOP:
        return _TO_HF_TOP[name]
    _, n, leaf = name.split(".", 2)
    return f"model.layers.{n}.{_TO_HF_LAYER[leaf]}"


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE row order → HF's rotate-half order (what HF's converter does)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_hf_permute`; it acts within each head, so it also works per head slice."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def _hf_files(d: Path) -> tuple[list[Path], dict[str, str]]:
    """Safetensors files to read and, when sharded, the index's ``{key: file name}`` map."""
    single = d / "model.safetensors"
    if single.is_file():
        return [single], {}
    index_path = d / _HF_INDEX
    if not index_path.is_file():
        raise CheckpointError(f"{d}: neither model.safetensors nor {_HF_INDEX} found")
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    names = sorted(set(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or "/" in n or not (d / n).is_file():
            raise CheckpointError(f"{index_path}: weight_map names shard {n!r}, which is not in {d}")
    return [d / n for n in names], weight_map


def _hf_entries(d: Path, args: ModelArgs, stack: ExitStack) -> dict[str, _Entry]:
    files, weight_map = _hf_files(d)
    entries: dict[str, _Entry] = {}
    for path in files:
        try:
            f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            names = list(f.keys())
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors file; truncated or corrupt? ({e})") from e
        for hf_name in names:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = _from_hf_name(hf_name)
            if name == "output.weight" and args.tie_word_embeddings:
                continue  # tied: the embedding is the head; a stored copy is redundant
            if name is None:
                raise CheckpointError(f"{path}: unknown key {hf_name!r} (not a LLaMA weight)")
            if name in entries:
                raise CheckpointError(f"{path}: key {hf_name!r} is also in {entries[name].source}")
            heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}.get(_leaf(name))
            shape = tuple(f.get_slice(hf_name).get_shape())
            entries[name] = _Entry(f"{path} key {hf_name!r}", shape, _hf_reader(f, hf_name, heads, args.head_dim))
    for hf_name, fname in weight_map.items():
        name = _from_hf_name(hf_name)
        if name is not None and name not in entries and not (name == "output.weight" and args.tie_word_embeddings):
            raise CheckpointError(f"{d / fname}: key {hf_name!r} listed in {_HF_INDEX} is not in the file")
    return entries


def _hf_reader(f: Any, name: str, heads: Optional[int], head_dim: int) -> Callable[[Optional[Slice]], torch.Tensor]:
    def read(sl: Optional[Slice]) -> torch.Tensor:
        if sl is None:
            t = f.get_tensor(name)
        elif sl[0] == 0:
            t = f.get_slice(name)[sl[1]:sl[2]]
        else:
            t = f.get_slice(name)[:, sl[1]:sl[2]]
        if heads is not None:  # q/k rows: slices are whole heads, so undo per slice
            t = _hf_unpermute(t, t.shape[0] // head_dim)
        return t
    return read


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _weight_files(d: Path, layout: Layout) -> list[Path]:
    return _meta_shard_files(d) if layout == "meta" else _hf_files(d)[0]


def _check_parallel(d: Path, args: ModelArgs, world_size: int, rank: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise CheckpointError(f"{d}: invalid tensor-parallel rank {rank} of world_size {world_size}")
    for what, n in (("n_heads", args.n_heads), ("FFN width", args.hidden_dim)):
        if n % world_size:
            raise CheckpointError(f"{d}: {what}={n} is not divisible by tensor-parallel world_size={world_size}")
    kv = args.n_kv_heads
    if kv % world_size and world_size % kv:
        raise CheckpointError(f"{d}: n_kv_heads={kv} and tensor-parallel world_size={world_size} "
                              "must divide one another")


def _tp_slice(name: str, args: ModelArgs, world_size: int, rank: int) -> Optional[Slice]:
    """This rank's part of tensor ``name``: column-parallel rows, row-parallel columns, or whole."""
    if world_size == 1:
        return None
    leaf, hd = _leaf(name), args.head_dim
    q, ffn = args.n_heads // world_size * hd, args.hidden_dim // world_size
    if leaf in ("attention.wk.weight", "attention.wv.weight"):
        if args.n_kv_heads >= world_size:
            kv = args.n_kv_heads // world_size * hd
            return 0, rank * kv, (rank + 1) * kv
        # Fewer KV heads than ranks: consecutive ranks share (replicate) one KV head.
        head = rank // (world_size // args.n_kv_heads)
        return 0, head * hd, (head + 1) * hd
    spans = {"attention.wq.weight": (0, q), "attention.wo.weight": (1, q),
             "feed_forward.w1.weight": (0, ffn), "feed_forward.w3.weight": (0, ffn),
             "feed_forward.w2.weight": (1, ffn)}
    if leaf not in spans:
        return None  # embeddings, output head and norms are whole on every rank
    dim, n = spans[leaf]
    return dim, rank * n, (rank + 1) * n


def _full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full shape of every checkpoint tensor (checkpoint names: q/k/v and w1/w3 separate)."""
    sd = split_fused_weights(empty_model(args).state_dict(), args)
    return {k: tuple(v.shape) for k, v in sd.items()}


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "auto",
               device: str | torch.device | None = None, world_size: int = 1, rank: int = 0,
               adapters: Sequence["LoraAdapter"] = ()) -> Transformer:
    """Load a Meta- or HF-layout checkpoint into a :class:`Transformer` in eval mode.

    ``dtype`` is resolved for ``device`` (``auto``: bf16/fp16 on GPU, fp32 on CPU); ``device``
    defaults to CUDA when available. With ``world_size > 1`` only rank ``rank``'s tensor-parallel
    slice is read. Raises :class:`CheckpointError` naming the file for anything wrong on disk.

    ``adapters`` (full, unsliced :class:`batchgen.lora.LoraAdapter` s) are merged into the
    weights (``W + scale * B @ A``, in fp32) before q/k/v and w1/w3 are fused: the adapters'
    names are the checkpoint's, and on a tensor-parallel rank each adapter is cut the way the
    base is (:meth:`~batchgen.lora.LoraAdapter.tp_slice`). A merged adapter costs nothing per step.
    """
    d = Path(model_dir)
    layout = detect_layout(d)
    args = load_args(d)
    _check_parallel(d, args, world_size, rank)
    dev = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, dev)
    expected = _full_shapes(args)
    if args.tie_word_embeddings:
        expected.pop("output.weight")
    with ExitStack() as stack:
        entries = _meta_entries(d) if layout == "meta" else _hf_entries(d, args, stack)
        if args.tie_word_embeddings:
            entries.pop("output.weight", None)
        config = d / ("params.json" if layout == "meta" else "config.json")
        for name, e in entries.items():
            if name not in expected:
                raise CheckpointError(f"{e.source}: unknown key (no such weight in a LLaMA model)")
            if e.shape != expected[name]:
                raise CheckpointError(f"{e.source}: shape mismatch: expected {expected[name]} "
                                      f"from {config.name}, got {e.shape}")
        missing = sorted(set(expected) - set(entries))
        if missing:
            files = sorted({str(p) for p in _weight_files(d, layout)})
            shown = [_to_hf_name(k) if layout == "hf" else k for k in missing[:3]]
            raise CheckpointError(f"{', '.join(files)}: missing {len(missing)} key(s) that {config.name} "
                                  f"needs, e.g. {shown}")
        sd = {}
        for name, e in entries.items():
            try:
                t = e.read(_tp_slice(name, args, world_size, rank))
            except Exception as err:
                raise CheckpointError(f"{e.source}: cannot read tensor ({err})") from err
            # A no-op for a contiguous same-dtype CPU slice: the parameter stays on the mmap.
            sd[name] = t.to(device=dev, dtype=dt).contiguous()
    if adapters:
        from batchgen.lora import merge_into_state_dict  # lora imports model only; no cycle at call time

        for a in adapters:
            sd = merge_into_state_dict(sd, a.tp_slice(world_size, rank, args))
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    # Built only once every key and shape checked: a bad checkpoint is refused before this.
    model = empty_model(args, world_size, rank)
    model.load_state_dict(fuse_weights(sd), strict=True, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True made two Parameters
    return model.eval()


__all__ = ["CheckpointError", "Layout", "detect_layout", "load_args", "load_model", "recorded_context"]
