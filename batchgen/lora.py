"""LoRA adapters in PEFT's format, mapped onto batchgen's Meta-named model.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
older ``adapter_model.bin`` pickle alpaca-lora published, read with ``weights_only=True`` only).
Its keys use Hugging Face's module names (``...layers.N.self_attn.q_proj.lora_A.weight``) and its
q/k updates were trained against HF's rotate-half row order; :func:`load_adapter` maps both onto
batchgen's names and Meta's interleaved order (the base loader undoes the same permutation on the
base q/k weights, so the result is right whether the base came in the HF or the Meta layout).

Two ways to run an adapter:

* merged (one adapter for the whole job): :func:`merge_into_state_dict` adds ``scale * B @ A`` to
  an unfused Meta-named state dict before the model is built, so a step costs nothing extra;
* unmerged (rows of several adapters in one step): ``batchgen.engine.adapters`` holds a job's
  adapters in slots (``LoraStack``) and adds each row's low-rank update to the output of the
  base matmul that ran once for all rows (``lora_forward``).

This module imports neither ray nor pyarrow (it sits beside ``batchgen/model.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from batchgen.model import ModelArgs

#: batchgen's projection names, in the order the layer runs them.
PROJECTIONS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
_HF_PROJ = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
            "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}
_META_MODULE = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                "w1": "feed_forward.w1", "w3": "feed_forward.w3", "w2": "feed_forward.w2"}
# Column-parallel projections cut their output rows across ranks; row-parallel ones their input.
_COLUMN_PARALLEL = {"wq", "wk", "wv", "w1", "w3"}
# PEFT writes "lora_A.weight" (adapter name stripped) or, from some versions and tools,
# "lora_A.<adapter name>.weight"; any prefix ("base_model.model.", none) before "model.layers".
_KEY_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_CONFIG = "adapter_config.json"
_SAFETENSORS = "adapter_model.safetensors"
_BIN = "adapter_model.bin"


class AdapterError(ValueError):
    """An adapter directory or file is missing, malformed, unsupported or does not fit the model."""


@dataclass
class LoraWeights:
    """One projection's low-rank update: ``delta = scale * B @ A`` in Meta orientation."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraAdapter:
    """A loaded adapter: per ``(layer, projection)`` the LoRA factors, in batchgen's names and order.

    Projections are ``wq wk wv wo w1 w3 w2`` (see :data:`PROJECTIONS`). A TP slice (see
    :meth:`tp_slice`) has ``world_size``/``rank`` set and holds only that rank's part.
    """

    name: str
    source: str  # the directory it came from, for messages and provenance
    weights: dict[tuple[int, str], LoraWeights]
    world_size: int = 1
    rank: int = 0
    _fingerprint: Optional[str] = field(default=None, repr=False)

    def delta(self, layer: int, proj: str) -> torch.Tensor:
        """``scale * B @ A`` [out, in] in fp32 for one projection (zeros are not stored: KeyError)."""
        w = self.weights[(layer, proj)]
        return (w.B.float() @ w.A.float()) * w.scale

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors (what a replica keeps resident per adapter)."""
        return sum(w.A.numel() * w.A.element_size() + w.B.numel() * w.B.element_size()
                   for w in self.weights.values())

    @property
    def fingerprint(self) -> str:
        """sha256 of the factors (as fp32) and scales, before any TP slicing, for provenance."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.weights)
        return self._fingerprint

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)

    def to(self, dtype: Optional[torch.dtype] = None, device: str | torch.device | None = None) -> "LoraAdapter":
        """A copy with every factor moved to ``dtype``/``device`` (the fingerprint is kept)."""
        ws = {k: LoraWeights(w.A.to(device=device, dtype=dtype), w.B.to(device=device, dtype=dtype), w.scale)
              for k, w in self.weights.items()}
        return LoraAdapter(self.name, self.source, ws, self.world_size, self.rank, self.fingerprint)

    def tp_slice(self, world_size: int, rank: int, args: ModelArgs) -> "LoraAdapter":
        """This tensor-parallel rank's part, cut the way batchgen cuts the base weights.

        Column-parallel ``wq wk wv w1 w3``: B's output rows, as the base's (with fewer KV heads than
        ranks, each rank keeps a copy of the KV head it uses). Row-parallel ``wo w2``: A's input
        columns; each rank's update is then a partial sum that the layer's all-reduce completes,
        so it must be added *before* that all-reduce.
        """
        if self.world_size != 1:
            raise ValueError(f"adapter {self.name!r} is already a TP slice ({self.rank}/{self.world_size})")
        if world_size == 1:
            return self
        ws = {}
        for (layer, proj), w in self.weights.items():
            dim, lo, hi = _tp_span(proj, args, world_size, rank)
            if dim == 0:
                ws[(layer, proj)] = LoraWeights(w.A, w.B[lo:hi].contiguous(), w.scale)
            else:
                ws[(layer, proj)] = LoraWeights(w.A[:, lo:hi].contiguous(), w.B, w.scale)
        return LoraAdapter(self.name, self.source, ws, world_size, rank, self.fingerprint)


def _fingerprint(weights: dict[tuple[int, str], LoraWeights]) -> str:
    h = hashlib.sha256()
    for (layer, proj) in sorted(weights):
        w = weights[(layer, proj)]
        h.update(f"{layer}.{proj}:{w.scale!r}:{tuple(w.A.shape)}:{tuple(w.B.shape)};".encode())
        for t in (w.A, w.B):  # fp32 values: the same adapter held in another dtype hashes alike
            h.update(t.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tp_span(proj: str, args: ModelArgs, world_size: int, rank: int) -> tuple[int, int, int]:
    """(0 = B's rows | 1 = A's columns, start, stop) of ``proj`` on ``rank``; mirrors the base
    weights' cut in ``batchgen.checkpoint`` (kept here so the two layouts can evolve apart)."""
    hd = args.head_dim
    if proj in ("wk", "wv"):
        if args.n_kv_heads >= world_size:
            kv = args.n_kv_heads // world_size * hd
            return 0, rank * kv, (rank + 1) * kv
        head = rank // (world_size // args.n_kv_heads)  # consecutive ranks share one KV head
        return 0, head * hd, (head + 1) * hd
    n = {"wq": args.n_heads // world_size * hd, "wo": args.n_heads // world_size * hd,
         "w1": args.hidden_dim // world_size, "w3": args.hidden_dim // world_size,
         "w2": args.hidden_dim // world_size}[proj]
    return (0 if proj in _COLUMN_PARALLEL else 1), rank * n, (rank + 1) * n


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of the full (unsliced) model."""
    q, kv, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    return {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q),
            "w1": (ffn, args.dim), "w3": (ffn, args.dim), "w2": (args.dim, ffn)}


def _hf_unpermute_rows(b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order → Meta's interleaved RoPE order, on B's output rows.

    The same map ``batchgen.checkpoint`` applies to the base q/k weights: delta = B @ A, so
    permuting the rows of B permutes the rows of the delta.
    """
    out, r = b.shape
    return b.reshape(n_heads, 2, out // n_heads // 2, r).transpose(1, 2).reshape(out, r)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of
    the module's full name (``model.layers.3.self_attn.q_proj``), as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(d: Path) -> dict[str, Any]:
    path = d / _CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{path}: file is missing; expected a PEFT adapter directory") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r} is not supported; only LORA adapters are")
    refusals = [
        (cfg.get("bias", "none") not in (None, "none"),
         f"bias={cfg.get('bias')!r} is not supported (trained biases); only bias='none'"),
        (bool(cfg.get("modules_to_save")),
         f"modules_to_save={cfg.get('modules_to_save')!r} is not supported (fully trained modules)"),
        (bool(cfg.get("use_dora")), "use_dora=true (DoRA) is not supported"),
        (bool(cfg.get("lora_bias")), "lora_bias=true is not supported"),
        (bool(cfg.get("layer_replication")), "layer_replication is not supported"),
        (bool(cfg.get("target_parameters")), "target_parameters is not supported"),
        (bool(cfg.get("trainable_token_indices")), "trainable_token_indices is not supported (trained embedding rows)"),
    ]
    for bad, why in refusals:
        if bad:
            raise AdapterError(f"{path}: {why}")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (key == "r" and not isinstance(v, int)):
            raise AdapterError(f"{path}: field {key!r} must be a positive number, got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{path}: field {key!r} must be an object, got {cfg[key]!r}")
    return cfg


def _targets(cfg: dict[str, Any], path: Path, n_layers: int) -> set[tuple[int, str]]:
    """The (layer, HF projection) pairs the config's target_modules/layers_to_transform select."""
    # PEFT's default for LLaMA when a config names none (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
    tm = cfg.get("target_modules") or ["q_proj", "v_proj"]
    layers: Any = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (not isinstance(layers, list) or
                               not all(isinstance(i, int) and 0 <= i < n_layers for i in layers)):
        raise AdapterError(f"{path}: layers_to_transform {cfg.get('layers_to_transform')!r} must be "
                           f"layer indices below n_layers={n_layers}")
    wanted = range(n_layers) if layers is None else layers
    excl = cfg.get("exclude_modules")
    out = set()
    if isinstance(tm, str) and tm.lower() == "all-linear":
        tm = list(_HF_PROJ)
    if isinstance(tm, list):
        unknown = [t for t in tm if not isinstance(t, str) or t.split(".")[-1] not in _HF_PROJ]
        if unknown:
            raise AdapterError(f"{path}: target_modules {unknown} not supported; batchgen can adapt "
                               f"{sorted(_HF_PROJ)} only")
        for n in wanted:
            for hf in _HF_PROJ:
                full = f"model.layers.{n}.{_HF_MODULE[hf]}"
                if any(full == t or full.endswith("." + t) for t in tm):
                    out.add((n, hf))
    elif isinstance(tm, str):
        try:
            rx = re.compile(tm)
        except re.error as e:
            raise AdapterError(f"{path}: target_modules regex {tm!r} is invalid ({e})") from e
        out = {(n, hf) for n in wanted for hf in _HF_PROJ if rx.fullmatch(f"model.layers.{n}.{_HF_MODULE[hf]}")}
    else:
        raise AdapterError(f"{path}: target_modules must be a list of module names or a regex, got {tm!r}")
    if isinstance(excl, str):
        out = {(n, hf) for n, hf in out if not re.fullmatch(excl, f"model.layers.{n}.{_HF_MODULE[hf]}")}
    elif isinstance(excl, list):
        out = {(n, hf) for n, hf in out
               if not any(f"model.layers.{n}.{_HF_MODULE[hf]}".endswith(e) for e in excl)}
    if not out:
        raise AdapterError(f"{path}: target_modules {cfg.get('target_modules')!r} selects no LLaMA "
                           "projection (q/k/v/o_proj, gate/up/down_proj)")
    return out


def _read_weights(d: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st, bn = d / _SAFETENSORS, d / _BIN
    if st.is_file():
        try:
            return st, load_file(str(st), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{st}: cannot read safetensors file; truncated or corrupt? ({e})") from e
    if bn.is_file():
        try:
            obj = torch.load(bn, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AdapterError(f"{bn}: refused: the file holds Python objects other than tensors, and "
                               "adapters are only loaded with weights_only=True") from e
        except Exception as e:  # damaged zip/pickle archives raise many types
            raise AdapterError(f"{bn}: cannot read adapter weights; truncated or corrupt? ({e})") from e
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise AdapterError(f"{bn}: expected a dict of name -> tensor")
        return bn, obj
    raise AdapterError(f"{d}: no adapter weights; expected {_SAFETENSORS} or {_BIN}")


def load_adapter(path: str | Path, args: ModelArgs, name: str, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read the PEFT LoRA adapter in directory ``path`` for a model of shape ``args``.

    The factors come out in batchgen's names and Meta's q/k row order, as ``dtype`` on the CPU.
    Raises :class:`AdapterError` naming the file and the problem for an unsupported option
    (``bias``, ``modules_to_save``, DoRA, non-LoRA types), an unknown target module, a missing
    weight or a shape that does not fit ``args``.
    """
    d = Path(path)
    if not d.is_dir():
        raise AdapterError(f"{d}: not a directory; expected a PEFT adapter directory with {_CONFIG}")
    cfg = _read_config(d)
    cfg_path = d / _CONFIG
    targets = _targets(cfg, cfg_path, args.n_layers)
    wpath, tensors = _read_weights(d)
    found: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None or m.group(3) not in _HF_PROJ or _HF_MODULE[m.group(3)].split(".")[0] != m.group(2):
            raise AdapterError(f"{wpath}: key {key!r} is not a LoRA factor of a LLaMA projection "
                               f"(unknown target module; batchgen can adapt {sorted(_HF_PROJ)})")
        layer, hf, ab = int(m.group(1)), m.group(3), m.group(4)
        if layer >= args.n_layers:
            raise AdapterError(f"{wpath}: key {key!r} names layer {layer}; the model has {args.n_layers}")
        if (layer, hf) not in targets:
            raise AdapterError(f"{wpath}: key {key!r} is a module the config's target_modules/"
                               "layers_to_transform do not select")
        slot = found.setdefault((layer, hf), {})
        if ab in slot:
            raise AdapterError(f"{wpath}: keys {slot[ab][0]!r} and {key!r} are both lora_{ab} of one module")
        slot[ab] = (key, t)
    missing = sorted(f"model.layers.{n}.{_HF_MODULE[hf]}.lora_{ab}" for n, hf in targets for ab in "AB"
                     if ab not in found.get((n, hf), {}))
    if missing:
        raise AdapterError(f"{wpath}: missing {len(missing)} LoRA weight(s) that {_CONFIG}'s target_modules "
                           f"select, e.g. {missing[:3]}")
    shapes = _shapes(args)
    r0, alpha0 = cfg["r"], float(cfg["lora_alpha"])
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    weights: dict[tuple[int, str], LoraWeights] = {}
    for (layer, hf), slot in sorted(found.items()):
        (ka, a), (kb, b) = slot["A"], slot["B"]
        proj, module = _HF_PROJ[hf], f"model.layers.{layer}.{_HF_MODULE[hf]}"
        r = _pattern_value(rank_pat, module, r0)
        out_f, in_f = shapes[proj]
        # lora_A/lora_B are Linear(in, r)/Linear(r, out) whatever fan_in_fan_out says: that flag
        # only transposes the merged delta for Conv1D bases (GPT-2), never a LLaMA's nn.Linear.
        for key, t, want in ((ka, a, (r, in_f)), (kb, b, (out_f, r))):
            if tuple(t.shape) != want:
                raise AdapterError(f"{wpath}: key {key!r} has shape {tuple(t.shape)}; expected {want} "
                                   f"(rank {r} from {_CONFIG}, projection {out_f}x{in_f} from the model)")
        alpha = float(_pattern_value(alpha_pat, module, alpha0))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        b = b.float()
        if proj in ("wq", "wk"):
            b = _hf_unpermute_rows(b, args.n_heads if proj == "wq" else args.n_kv_heads)
        weights[(layer, proj)] = LoraWeights(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scale)
    return LoraAdapter(name=name, source=str(d), weights=weights)


def _hf_permute_rows(b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_hf_unpermute_rows`: Meta's order → HF's rotate-half order."""
    out, r = b.shape
    return b.reshape(n_heads, out // n_heads // 2, 2, r).transpose(1, 2).reshape(out, r)


def save_adapter(adapter: LoraAdapter, args: ModelArgs, out_dir: str | Path) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``, HF names and q/k row order) that :func:`load_adapter` and
    ``peft.PeftModel.from_pretrained`` read. Every projection must share one rank and one scale."""
    from safetensors.torch import save_file

    if adapter.world_size != 1:
        raise ValueError(f"adapter {adapter.name!r} is a TP slice; save the full adapter")
    ranks = {w.rank for w in adapter.weights.values()}
    scales = {w.scale for w in adapter.weights.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"adapter {adapter.name!r} mixes ranks {sorted(ranks)} or scales {sorted(scales)}")
    r, scale = ranks.pop(), scales.pop()
    to_hf = {v: k for k, v in _HF_PROJ.items()}
    tensors = {}
    for (layer, proj), w in adapter.weights.items():
        b = w.B.detach().float().cpu()
        if proj in ("wq", "wk"):
            b = _hf_permute_rows(b, args.n_heads if proj == "wq" else args.n_kv_heads)
        prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULE[to_hf[proj]]}"
        tensors[f"{prefix}.lora_A.weight"] = w.A.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    layers = sorted({layer for layer, _ in adapter.weights})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r,
        "target_modules": sorted({to_hf[p] for _, p in adapter.weights}), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None if layers == list(range(args.n_layers)) else layers,
        "base_model_name_or_path": None, "revision": None,
    }
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / _SAFETENSORS), metadata={"format": "pt"})
    (d / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return d


# ---------------------------------------------------------------------------------------------
# Merged mode
# ---------------------------------------------------------------------------------------------


def merge_into_state_dict(state_dict: dict[str, torch.Tensor], adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with ``scale * B @ A`` added to each adapted weight.

    ``state_dict`` is unfused and Meta-named (``layers.N.attention.wq.weight`` ...), full or one
    TP rank's slice (then pass ``adapter.tp_slice(...)`` of the same rank). The sum is formed in
    fp32 and stored in the weight's dtype; unadapted tensors are passed through, not copied.
    """
    out = dict(state_dict)
    for (layer, proj), w in adapter.weights.items():
        key = f"layers.{layer}.{_META_MODULE[proj]}.weight"
        if key not in out:
            raise AdapterError(f"{adapter.source}: adapter {adapter.name!r} adapts {key}, which the "
                               "state dict does not have")
        base = out[key]
        d = (w.B.to(base.device, torch.float32) @ w.A.to(base.device, torch.float32)) * w.scale
        if d.shape != base.shape:
            raise AdapterError(f"{adapter.source}: adapter {adapter.name!r} update for {key} is "
                               f"{tuple(d.shape)}, the weight is {tuple(base.shape)} (a TP slice "
                               "needs adapter.tp_slice of the same rank)")
        out[key] = (base.float() + d).to(base.dtype)
    return out


__all__ = ["AdapterError", "LoraAdapter", "LoraWeights", "PROJECTIONS", "load_adapter", "save_adapter",
           "merge_into_state_dict"]
