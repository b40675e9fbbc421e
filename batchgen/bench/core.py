"""The bench's shared core: the workload, timing, the FLOP/byte model, the token check and the report.

Everything the systems under test (``systems``), the GPU extras (``gpu``) and the pipeline
rounds (``pipeline``) share lives here, so that they import this module and never each other;
``run`` puts them together for ``batchgen bench``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from batchgen.model import ModelArgs, Transformer

# The model: ~134M parameters, MHA. max_seq_len only sizes RoPE tables here; the
# engine's KV cache is sized from the workload (see EngineSystem).
BENCH_ARGS = ModelArgs(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000)
# --quick: small enough for a test, GQA so both attention layouts are exercised somewhere.
QUICK_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512,
                       max_seq_len=128)

# Request slots of the engine, as in a job (the default model.max_num_seqs).
MAX_NUM_SEQS = 64

# A divergence is tolerated only where the two tokens' logits are closer than this. fp32
# implementations differ by ~1e-5 in the logits; bf16's rounding step near |logit| ~ 2 is ~1e-2.
TIE_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class Workload:
    """Prompts (token ids) and how many tokens each asks for; all greedy with ``ignore_eos``."""

    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def max_total_len(self) -> int:
        return max(len(p) + n for p, n in zip(self.prompts, self.max_tokens))


@dataclass
class RunResult:
    """One system's tokens per request (from its last run) and its wall times (one per run)."""

    tokens: list[list[int]]
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


def make_workload(n: int, vocab_size: int, seed: int, prompt_len: tuple[int, int],
                  output_len: tuple[int, int]) -> Workload:
    """``n`` prompts of random ids (never 0-2: pad/BOS/EOS), lengths uniform in the inclusive ranges."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prompt_len[0], prompt_len[1] + 1, (n,), generator=g).tolist()
    outs = torch.randint(output_len[0], output_len[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, vocab_size, (n_p,), generator=g).tolist() for n_p in lens]
    return Workload(prompts, outs)


def templated_workload(n: int, vocab_size: int, seed: int, prefix_len: int, row_len: tuple[int, int],
                       max_tokens: int) -> Workload:
    """``n`` prompts that share one ``prefix_len``-token prefix (a template's instructions),
    each followed by its own ``row_len`` tokens (uniform, inclusive); ``max_tokens`` each."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab_size, (prefix_len,), generator=g).tolist()
    lens = torch.randint(row_len[0], row_len[1] + 1, (n,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, vocab_size, (k,), generator=g).tolist() for k in lens]
    return Workload(prompts, [max_tokens] * n)


def build_model(args: ModelArgs, seed: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A randomly initialised model (PyTorch's default init), identical for a given seed."""
    torch.manual_seed(seed)
    return Transformer(args).to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(system: Any, device: torch.device, result: RunResult) -> None:
    """One timed ``system.run()`` (wall time, prefill included) appended to ``result``."""
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        result.tokens = system.run()
        sync(device)
        result.seconds.append(time.perf_counter() - t0)


def compare_tokens(model: Transformer, hf: Any, wl: Workload, ours: list[list[int]], theirs: list[list[int]],
                   tol: float) -> dict[str, Any]:
    """Agreement of two systems' greedy tokens; every first divergence must be a near-tie.

    At a request's first divergence both models are re-run without any cache on the common
    prefix, and the two competing tokens' logits must be within ``tol`` of each other in both:
    otherwise one system computed something else (a bug, not rounding).
    """
    matched, divergences = 0, []
    for i, (p, a, b) in enumerate(zip(wl.prompts, ours, theirs)):
        if len(a) != wl.max_tokens[i] or len(b) != wl.max_tokens[i]:
            raise RuntimeError(f"request {i}: asked for {wl.max_tokens[i]} tokens, "
                               f"got {len(a)} (batchgen) and {len(b)} (transformers)")
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        matched += j
        if j == len(a):
            continue
        seq = torch.tensor([p + a[:j]], device=next(model.parameters()).device)
        with torch.inference_mode():
            ref = model.logits_full(seq)[0, -1]
            ref_hf = hf(seq).logits[0, -1].float() if hf is not None else ref
        gap = max(abs(float(ref[a[j]] - ref[b[j]])), abs(float(ref_hf[a[j]] - ref_hf[b[j]])))
        divergences.append({"request": i, "position": j, "batchgen_token": a[j], "hf_token": b[j],
                            "logit_gap": gap, "tie": gap <= tol})
    return {"tokens_match_fraction": matched / wl.output_tokens, "divergences": divergences,
            "tie_tolerance": tol, "ok": all(d["tie"] for d in divergences)}


def linear_flops_per_token(args: ModelArgs) -> int:
    """Multiply-add FLOPs of one token through every layer's projections (no output head)."""
    hd = args.head_dim
    attn = args.dim * hd * (2 * args.n_heads + 2 * args.n_kv_heads)  # wq, wo, wk, wv
    ffn = 3 * args.dim * args.hidden_dim
    return 2 * args.n_layers * (attn + ffn)


def request_flops(args: ModelArgs, prompt_len: int, n_out: int) -> int:
    """FLOPs a request needs at minimum: its prompt and all but its last output token pass through
    the layers (attention over each one's causal context), and ``n_out`` rows of logits."""
    fed = prompt_len + n_out - 1
    context_sum = fed * (fed + 1) // 2  # token at position i attends to i + 1 keys
    attention = 4 * args.n_layers * args.n_heads * args.head_dim * context_sum  # QK^T and PV
    return fed * linear_flops_per_token(args) + attention + n_out * 2 * args.dim * args.vocab_size


def min_traffic_bytes(args: ModelArgs, wl: Workload, elem_bytes: int) -> int:
    """Bytes any implementation must read from memory: the weights once per step (at least one
    step per token of the longest request) and, for each generated token, the cached K and V of
    its whole context. Together with the FLOP count it bounds the run from both sides."""
    weights = (linear_flops_per_token(args) // 2 + args.dim * args.vocab_size) * elem_bytes
    kv_per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem_bytes
    contexts = sum((n - 1) * p + n * (n - 1) // 2 for p, n in zip(map(len, wl.prompts), wl.max_tokens))
    return max(wl.max_tokens) * weights + contexts * kv_per_token


def measure_peak_gflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """The best rate of an ``n``x``n`` matmul: what this device does at its most efficient."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        a @ b
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def measure_bandwidth_gbps(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Best memory copy rate (bytes read + written per second) over a buffer of ``nbytes``."""
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'cpu'}, {os.cpu_count()} logical cores"


def print_report(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
        return
    print(f"batchgen   {r['tokens_per_s']:9.1f} tok/s   {r['achieved_gflops']:.1f} GFLOP/s useful "
          f"= {r['roofline_fraction']:.2f} of a {r['peak_gflops']:.1f} GFLOP/s matmul; "
          f"{r['min_memory_gb']:.1f} GB to read = {r['memory_roofline_fraction']:.2f} of {r['memory_gbps']:.1f} GB/s")
    if r["hf_tokens_per_s"] is not None:
        print(f"transformers {r['hf_tokens_per_s']:7.1f} tok/s   speedup {r['speedup_vs_hf']:.2f}x   "
              f"tokens match {r['tokens_match_fraction']:.4f}")
        for d in r["divergences"]:
            kind = "near-tie" if d["tie"] else "NOT A TIE (bug)"
            print(f"  request {d['request']} diverges at token {d['position']}: logit gap "
                  f"{d['logit_gap']:.2e} ({kind})")
    pc = r.get("prefix_cache")
    if pc:
        print(f"  without prefix caching {pc['no_cache_tokens_per_s']:7.1f} tok/s: caching is {pc['speedup']:.2f}x; "
              f"prefill computed {pc['prefill_tokens_computed']} of {pc['prefill_tokens_submitted']} tokens "
              f"submitted (without: {pc['no_cache_prefill_tokens_computed']}); tokens equal: {pc['tokens_equal']}")
    gpu = f", peak GPU memory {r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] is not None else ""
    matmul = f" ({r['cpu_matmul']} matmuls)" if r["cpu_matmul"] else ""
    print(f"{r['device']} ({r['machine']}), {r['dtype']}{matmul}, {r['torch_threads']} threads, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}, KV cache {r['kv_cache_bytes'] / 2**20:.0f} MiB")
    for p in r.get("pipeline", []):
        print(f"pipeline, {p['replicas']} replica(s): {p['tokens_per_s']:7.1f} tok/s, "
              f"{statistics.median(p['seconds']):.1f} s = {p['overhead_vs_engine']:+.1%} vs the bare engine "
              f"({p['shards']} shards, first started after {statistics.median(p['startup_seconds']):.1f} s; "
              f"tokens match {p['tokens_match_fraction']:.4f})")
    g = r.get("gpu_extras")
    if g and "skipped" in g:
        print(f"single-stream decode skipped: {g['skipped']}")
    elif g:
        print(f"single-stream decode ({g['model']}) {g['decode_tokens_per_s']:.1f} tok/s = {g['fraction_of_bound']:.2f} "
              f"of bandwidth/weights ({g['bandwidth_bound_tokens_per_s']:.1f} tok/s)")
        if g["cuda_graphs_decode_tokens_per_s"]:
            print(f"  from CUDA graphs {g['cuda_graphs_decode_tokens_per_s']:.1f} tok/s = "
                  f"{g['cuda_graphs_fraction_of_bound']:.2f} of the bound")
        if g["compiled_decode_tokens_per_s"]:
            print(f"  compiled graphs {g['compiled_decode_tokens_per_s']:.1f} tok/s = "
                  f"{g['compiled_fraction_of_bound']:.2f} of the bound")


