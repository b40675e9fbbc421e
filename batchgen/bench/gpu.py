"""``batchgen bench`` on a GPU: single-stream decode of a 7B-shaped model against HBM bandwidth.

One request decodes alone, so every step reads all weights once: bandwidth / weight bytes is the
ceiling on its tokens per second. The batch comparison with transformers is in ``batchgen.bench.run``,
which adds this report (``gpu_extras``) on CUDA.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any, Optional

import torch

from batchgen.bench.core import QUICK_ARGS, measure_bandwidth_gbps, sync
from batchgen.model import ModelArgs, count_parameters, empty_model


def single_stream_decode(device: torch.device, dtype: torch.dtype, seed: int,
                         args: Optional[ModelArgs] = None, steps: int = 256,
                         compile_decode: bool = False, attention_backend: str = "default") -> dict[str, Any]:
    """Single-stream decode of a random model (default: Llama 2 7B's shape) against memory
    bandwidth / weight bytes (``--gpu-extras``, where the bandwidth is the GPU's HBM)."""
    from batchgen.engine import LLM, SamplingParams

    args = args or ModelArgs.from_preset("llama-2-7b")
    n_params = count_parameters(args)
    weight_bytes = n_params * dtype.itemsize
    bw = measure_bandwidth_gbps(device, _probe_bytes(weight_bytes))
    model = empty_model(args).to(dtype)
    model = model.to_empty(device=device)  # allocated once, in dtype: 13.5 GB in bf16
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.eval()
    prompt = torch.randint(3, args.vocab_size, (16,), generator=torch.Generator().manual_seed(seed)).tolist()

    def decode_rate(cuda_graphs: bool, compiled: bool = False) -> float:
        llm = LLM(model=model, device=str(device), max_model_len=1024, max_num_seqs=1, kv_cache_bytes=1 << 30,
                  cuda_graphs=cuda_graphs, compile_decode=compiled, attention_backend=attention_backend)

        def timed(n: int) -> float:
            sync(device)
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))
            sync(device)
            return time.perf_counter() - t0

        timed(steps + 1)  # warm-up at full length: with graphs, every table width gets recorded here
        return steps / (timed(steps + 1) - timed(1))  # the prefill (and first token) cancels out

    tok_s = decode_rate(False)
    graphs_tok_s = decode_rate(True) if device.type == "cuda" else None
    compiled_tok_s = decode_rate(True, compiled=True) if compile_decode and device.type == "cuda" else None
    bound = bw * 1e9 / weight_bytes
    return {"model": f"random, dim {args.dim}, {args.n_layers} layers, "
                     + (f"{n_params / 1e9:.1f}B params" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M params"),
            "dtype": str(dtype).removeprefix("torch."), "attention_backend": attention_backend,
            "weight_bytes": weight_bytes, "decode_tokens_per_s": tok_s,
            "copy_gbps": bw, "bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": tok_s / bound,
            "cuda_graphs_decode_tokens_per_s": graphs_tok_s,
            "cuda_graphs_fraction_of_bound": graphs_tok_s / bound if graphs_tok_s else None,
            "compiled_decode_tokens_per_s": compiled_tok_s,
            "compiled_fraction_of_bound": compiled_tok_s / bound if compiled_tok_s else None}


def _probe_bytes(weight_bytes: int) -> int:
    """Size of the bandwidth probe's buffer next to a model: far past any cache, at most 2 GiB."""
    return min(2 << 30, max(64 << 20, weight_bytes))


def single_stream_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """GPU memory :func:`single_stream_decode` needs for ``args``: the weights, its 1 GiB KV
    cache, the bandwidth probe's two buffers and 1 GiB for activations and graph pools."""
    weights = count_parameters(args) * dtype.itemsize
    return weights + (1 << 30) + 2 * _probe_bytes(weights) + (1 << 30)


def gpu_extras(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, Any]:
    """Single-stream decode of the 7B shape (``--quick``: the tiny one); by default only where it
    fits, so that a bench on a small GPU still reports its batch numbers; always with ``--gpu-extras``."""
    shape = QUICK_ARGS if args.quick else ModelArgs.from_preset("llama-2-7b")
    gc.collect()  # the engine and transformers were just dropped; reference cycles may still hold them
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    need = single_stream_bytes(shape, dtype)
    if args.gpu_extras is None and free < need:
        return {"skipped": f"the single-stream run needs {need / 2**30:.1f} GiB of GPU memory, "
                           f"{free / 2**30:.1f} GiB is free (--gpu-extras runs it anyway)"}
    return single_stream_decode(device, dtype, args.seed, shape, steps=64 if args.quick else 256,
                                compile_decode=args.compile_decode,
                                attention_backend=args.attention_backend)
