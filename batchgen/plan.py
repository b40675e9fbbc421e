"""``batchgen plan``: does a model fit on given GPUs, and how large a batch does its KV cache allow?

The arithmetic follows what the engine does (see :mod:`batchgen.model` and the engine's cache):

- A tensor-parallel rank holds ``1/N`` of every attention and FFN matrix, and whole copies of
  the embeddings, the output head and the RMSNorm weights.
- Its KV cache stores, per token, K and V for its own KV heads in every layer:
  ``n_kv_heads / N`` heads, or one (replicated) head when there are fewer KV heads than ranks.
- The cache gets ``kv_fraction`` of the memory left after the weights (the engine's default
  takes 90% of what is free), allocated in blocks of ``block_size`` tokens.

Units: GB = 10^9 bytes. A card sold as "80 GB" has 80 GiB = 85.9 GB, so planning with
``--gpu-memory 80`` leaves about 7% for the CUDA context and activations, which are not modelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

from batchgen.model import PRESETS, ModelArgs

GB = 10**9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  # What "auto" resolves to on any GPU this is planned for (bf16-capable).
                  "auto": "bfloat16"}


class PlanError(ValueError):
    """The layout cannot work; the message says which number is wrong and by how much."""


@dataclass(frozen=True)
class Plan:
    """Memory layout of one model on ``gpus`` GPUs, in replicas of ``tensor_parallel`` GPUs each."""

    label: str
    args: ModelArgs
    dtype: str
    dtype_bytes: int
    tensor_parallel: int
    gpus: int
    gpu_memory_gb: float
    max_seq_len: int
    block_size: int
    kv_fraction: float
    params_total: int
    params_per_gpu: int
    replicated_params_per_gpu: int  # embeddings, output head and norms: whole on every rank
    weights_bytes_per_gpu: int
    kv_heads_per_gpu: int
    kv_replicated: bool  # fewer KV heads than ranks: ranks share copies of one head
    kv_bytes_per_token: int  # per GPU
    kv_budget_bytes: int  # per GPU
    kv_tokens: int  # per replica: every rank of a replica caches the same tokens
    max_batch: int  # sequences of max_seq_len held at once, per replica
    adapter_bytes_per_gpu: int = 0  # unmerged LoRA adapters resident beside the weights (LoraStack.nbytes)

    @property
    def replicas(self) -> int:
        return self.gpus // self.tensor_parallel

    @property
    def idle_gpus(self) -> int:
        return self.gpus - self.replicas * self.tensor_parallel

    @property
    def total_batch(self) -> int:
        return self.replicas * self.max_batch

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the model's args as a dict, derived numbers included)."""
        d = asdict(self)
        d.update(replicas=self.replicas, idle_gpus=self.idle_gpus, total_batch=self.total_batch)
        return d


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPE_BYTES:
        raise PlanError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    return name


def _local_kv_heads(args: ModelArgs, n: int) -> int:
    return max(1, args.n_kv_heads // n)


def _check_split(args: ModelArgs, n: int) -> Optional[str]:
    """Why ``args`` cannot be split into ``n`` tensor-parallel ranks, or None."""
    if args.n_heads % n:
        return f"n_heads={args.n_heads} is not divisible by tensor_parallel={n}"
    if args.hidden_dim % n:
        return f"the FFN width {args.hidden_dim} is not divisible by tensor_parallel={n}"
    if args.n_kv_heads % n and n % args.n_kv_heads:
        return f"n_kv_heads={args.n_kv_heads} and tensor_parallel={n} must divide one another"
    return None


def params_per_rank(args: ModelArgs, n: int) -> tuple[int, int]:
    """``(all, replicated)`` parameters one of ``n`` tensor-parallel ranks holds."""
    hd = args.head_dim
    q, kv, ffn = args.n_heads // n * hd, _local_kv_heads(args, n) * hd, args.hidden_dim // n
    per_layer = args.dim * (2 * q + 2 * kv) + 3 * args.dim * ffn  # wq, wo, wk, wv; w1, w2, w3
    norms = (2 * args.n_layers + 1) * args.dim
    embed = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    replicated = embed + norms
    return args.n_layers * per_layer + replicated, replicated


def plan_layout(args: ModelArgs, dtype: Any = "bfloat16", tensor_parallel: Optional[int] = 1, gpus: Optional[int] = None,
                gpu_memory_gb: float = 80.0, max_seq_len: Optional[int] = None, kv_fraction: float = 0.9,
                kv_cache_bytes: Optional[int] = None, block_size: int = 16, label: str = "model",
                adapter_bytes: int = 0) -> Plan:
    """Lay ``args`` out over ``gpus`` GPUs (default: one replica) of ``gpu_memory_gb`` each.

    ``tensor_parallel=None`` picks the smallest that works on ``gpus`` GPUs (most replicas).
    ``kv_cache_bytes`` fixes the per-GPU cache budget (the spec's ``kv_cache_memory_gb``);
    otherwise it is ``kv_fraction`` of what the weights leave (and ``adapter_bytes``, the unmerged
    LoRA adapters each GPU holds). Raises :class:`PlanError` for a
    layout that cannot work: a split that does not divide the heads, more ranks than GPUs,
    weights larger than a GPU, or a cache too small for one sequence of ``max_seq_len``.
    """
    if tensor_parallel is None:
        gpus = 1 if gpus is None else gpus
        first: Optional[PlanError] = None
        for n in range(1, gpus + 1):
            if _check_split(args, n) is None:
                try:
                    return plan_layout(args, dtype, n, gpus, gpu_memory_gb, max_seq_len, kv_fraction,
                                       kv_cache_bytes, block_size, label, adapter_bytes)
                except PlanError as e:
                    first = first or e
        raise first or PlanError(f"{label}: no tensor_parallel up to {gpus} splits it evenly "
                                 f"(n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, FFN {args.hidden_dim})")
    n = tensor_parallel
    gpus = n if gpus is None else gpus
    seq = max_seq_len if max_seq_len is not None else args.max_seq_len
    name = _dtype_name(dtype)
    for what, value in (("tensor_parallel", n), ("gpus", gpus), ("max_seq_len", seq), ("block_size", block_size)):
        if value < 1:
            raise PlanError(f"{what} must be >= 1, got {value}")
    if not gpu_memory_gb > 0:
        raise PlanError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb}")
    if not 0 < kv_fraction <= 1:
        raise PlanError(f"kv_fraction must be in (0, 1], got {kv_fraction}")
    if n > gpus:
        raise PlanError(f"tensor_parallel={n} needs {n} GPUs per replica, but only {gpus} GPU(s) are given")
    why = _check_split(args, n)
    if why:
        raise PlanError(f"{label}: {why}; valid tensor_parallel values: {_valid_splits(args, gpus) or 'none'}")

    nbytes = _DTYPE_BYTES[name]
    params, replicated = params_per_rank(args, n)
    weights = params * nbytes + adapter_bytes
    memory = int(gpu_memory_gb * GB)
    if weights >= memory:
        raise PlanError(f"{label} in {name} with tensor_parallel={n}: weights need {weights / GB:.1f} GB per GPU, "
                        f"more than the {gpu_memory_gb:g} GB of a GPU. {_suggest(args, name, gpu_memory_gb, seq, kv_fraction)}")
    free = memory - weights
    if kv_cache_bytes is not None:
        if kv_cache_bytes > free:
            raise PlanError(f"a KV cache of {kv_cache_bytes / GB:.1f} GB per GPU does not fit the "
                            f"{free / GB:.1f} GB left after {weights / GB:.1f} GB of weights")
        budget = kv_cache_bytes
    else:
        budget = int(free * kv_fraction)
    kv_heads = _local_kv_heads(args, n)
    per_token = 2 * args.n_layers * kv_heads * args.head_dim * nbytes
    blocks = budget // (per_token * block_size)
    blocks_per_seq = -(-seq // block_size)
    if blocks < blocks_per_seq:
        raise PlanError(f"{label} in {name} with tensor_parallel={n}: after {weights / GB:.1f} GB of weights the "
                        f"KV cache gets {budget / GB:.2f} GB per GPU = {blocks * block_size} tokens, less than "
                        f"one sequence of max_seq_len={seq}. {_suggest(args, name, gpu_memory_gb, seq, kv_fraction)}")
    return Plan(
        label=label, args=args, dtype=name, dtype_bytes=nbytes, tensor_parallel=n, gpus=gpus,
        gpu_memory_gb=gpu_memory_gb, max_seq_len=seq, block_size=block_size, kv_fraction=kv_fraction,
        params_total=params_per_rank(args, 1)[0], params_per_gpu=params, replicated_params_per_gpu=replicated,
        weights_bytes_per_gpu=weights - adapter_bytes, adapter_bytes_per_gpu=adapter_bytes, kv_heads_per_gpu=kv_heads, kv_replicated=args.n_kv_heads < n,
        kv_bytes_per_token=per_token, kv_budget_bytes=budget, kv_tokens=blocks * block_size,
        max_batch=blocks // blocks_per_seq,
    )


def _valid_splits(args: ModelArgs, limit: int) -> str:
    return ", ".join(str(n) for n in range(1, max(limit, 1) + 1) if _check_split(args, n) is None)


def _suggest(args: ModelArgs, dtype: str, gpu_memory_gb: float, seq: int, kv_fraction: float) -> str:
    """The smallest tensor_parallel that would fit, as advice for an error message."""
    for n in range(1, 257):
        if _check_split(args, n) is None:
            params, _ = params_per_rank(args, n)
            free = gpu_memory_gb * GB - params * _DTYPE_BYTES[dtype]
            per_seq = 2 * args.n_layers * _local_kv_heads(args, n) * args.head_dim * _DTYPE_BYTES[dtype] * seq
            if free > 0 and free * kv_fraction >= per_seq:
                return f"The smallest tensor_parallel that fits is {n}."
    return "No tensor_parallel up to 256 fits GPUs of this size."


def format_plan(plan: Plan) -> str:
    """The plan as an aligned two-column table."""
    a, n = plan.args, plan.tensor_parallel
    kv_note = (f"1 (each of the {a.n_kv_heads} KV heads replicated on {n // a.n_kv_heads} ranks)"
               if plan.kv_replicated else f"{plan.kv_heads_per_gpu} of {a.n_kv_heads}")
    layout = (f"{plan.gpus} GPU(s) x {plan.gpu_memory_gb:g} GB: {plan.replicas} replica(s) of "
              f"tensor_parallel={n}" + (f", {plan.idle_gpus} GPU(s) idle" if plan.idle_gpus else ""))
    rows = [
        ("model", f"{plan.label}: {plan.params_total / 1e9:.2f} B parameters (dim {a.dim}, {a.n_layers} layers, "
                  f"{a.n_heads} heads, {a.n_kv_heads} KV heads, vocab {a.vocab_size})"),
        ("dtype", f"{plan.dtype} ({plan.dtype_bytes} bytes)"),
        ("layout", layout),
        ("weights per GPU", f"{plan.weights_bytes_per_gpu / GB:.2f} GB ({plan.params_per_gpu / 1e9:.3f} B parameters, "
                            f"of which {plan.replicated_params_per_gpu / 1e9:.3f} B whole on every GPU: "
                            "embeddings, output, norms)"),
        *([("adapters per GPU", f"{plan.adapter_bytes_per_gpu / GB:.3f} GB (unmerged LoRA, resident)")]
          if plan.adapter_bytes_per_gpu else []),
        ("KV heads per GPU", kv_note),
        ("KV per token", f"{plan.kv_bytes_per_token:,} bytes per GPU"),
        ("KV cache per GPU", f"{plan.kv_budget_bytes / GB:.2f} GB"),
        ("KV tokens", f"{plan.kv_tokens:,} per replica (blocks of {plan.block_size})"),
        ("max batch", f"{plan.max_batch:,} sequences of {plan.max_seq_len} tokens per replica, "
                      f"{plan.total_batch:,} in all"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``batchgen plan`` (a job spec, or ``--preset``/``--model``, plus the GPUs)."""
    parser.add_argument("spec", nargs="?", help="job spec (YAML/JSON): model path, dtype, tensor_parallel from it")
    parser.add_argument("--preset", help=f"a model shape by name: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--model", help="a checkpoint directory (Meta or HF layout) to read the shape from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    parser.add_argument("--gpus", type=int, help="GPUs in all (default: one replica's worth, or 1)")
    parser.add_argument("--gpu-memory", type=float, help="GB per GPU (default: read from the first CUDA device)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and KV dtype (default: the spec's, else auto = bfloat16)")
    parser.add_argument("--tensor-parallel", type=int,
                        help="GPUs per replica (default: the spec's, else the smallest that fits)")
    parser.add_argument("--max-seq-len", type=int, help="context length (default: the spec's, else the model's)")
    parser.add_argument("--kv-fraction", type=float, default=0.9, help="share of post-weights memory for the KV cache")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _detect_gpu_memory_gb() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GB


def _from_spec(path: str, overrides: list[str]) -> dict[str, Any]:
    from batchgen.checkpoint import load_args
    from batchgen.pipeline.spec import is_uri, load_spec

    spec = load_spec(path, overrides).with_resolved_paths()
    m = spec.model
    if is_uri(m.path):
        raise PlanError(f"model.path {m.path!r}: plan reads the checkpoint's config, so it needs a local directory")
    return {
        "args": load_args(m.path), "label": m.path, "dtype": m.dtype, "tensor_parallel": m.tensor_parallel,
        "max_seq_len": m.max_seq_len,
        # As the replica sizes it: the spec's "GB" are taken as GiB there.
        "kv_cache_bytes": int(m.kv_cache_memory_gb * (1 << 30)) if m.kv_cache_memory_gb else None,
        "adapters": spec,
    }


def _adapter_bytes(spec: Any, args: ModelArgs, dtype: str, n: int) -> int:
    """Bytes one GPU (rank 0 of ``n``) holds for the job's unmerged adapters (0 when merged)."""
    from batchgen.engine.adapters import FUSE, LoraStack
    from batchgen.lora import load_adapter
    from batchgen.pipeline.adapters import local_adapters, merged

    if not spec.model.adapters or merged(spec):
        return 0
    full = [load_adapter(d, args, name) for name, d in local_adapters(spec).items()]
    stack = LoraStack([a.tp_slice(n, 0, args) for a in full], args, fuse=FUSE)  # fp32 here
    return stack.nbytes * _DTYPE_BYTES[_dtype_name(dtype)] // 4


def run_plan(args: argparse.Namespace) -> int:
    """``batchgen plan``: print the plan; exit 2 for bad input or an impossible layout."""
    from batchgen.checkpoint import CheckpointError, load_args
    from batchgen.pipeline.spec import SpecError

    sources = [s for s in ("spec", "preset", "model") if getattr(args, s)]
    if len(sources) != 1:
        print("error: give exactly one of a job spec, --preset or --model", file=sys.stderr)
        return 2
    try:
        if args.spec:
            found = _from_spec(args.spec, args.set)
        elif args.preset:
            if args.preset.lower() not in PRESETS:
                raise PlanError(f"unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}")
            found = {"args": ModelArgs.from_preset(args.preset), "label": args.preset}
        else:
            found = {"args": load_args(args.model), "label": args.model}
        memory = args.gpu_memory if args.gpu_memory is not None else _detect_gpu_memory_gb()
        if memory is None:
            raise PlanError("no CUDA device to read the GPU memory from: give --gpu-memory GB")
        # No tensor_parallel from the spec or the command line: the smallest that fits the GPUs.
        tp = args.tensor_parallel or found.get("tensor_parallel")
        dtype = args.dtype or found.get("dtype") or "auto"
        spec = found.get("adapters")
        adapter_bytes = _adapter_bytes(spec, found["args"], dtype, tp or 1) if spec is not None else 0
        plan = plan_layout(
            found["args"], dtype=args.dtype or found.get("dtype") or "auto", tensor_parallel=tp,
            gpus=args.gpus if args.gpus is not None else tp, gpu_memory_gb=memory,
            max_seq_len=args.max_seq_len or found.get("max_seq_len"), kv_fraction=args.kv_fraction,
            kv_cache_bytes=found.get("kv_cache_bytes"), block_size=args.block_size, label=found["label"],
            adapter_bytes=adapter_bytes,
        )
    except (PlanError, SpecError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


__all__ = ["GB", "Plan", "PlanError", "add_plan_args", "format_plan", "params_per_rank", "plan_layout", "run_plan"]
