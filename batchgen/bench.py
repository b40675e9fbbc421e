"""``batchgen bench``: the engine against ``transformers`` generate, on the same random weights.

One process, one run: build a seeded random LLaMA (or load a checkpoint), copy its weights into
``transformers.LlamaForCausalLM``, time both systems on the same greedy workload, check that
their tokens agree (a divergence is allowed only at a near-tie), and report throughput, FLOP
efficiency against a matmul measured in the same run, memory and the machine, as JSON with
``--json``. Exit codes: 0 ok, 1 a non-tie divergence (a bug), 2 bad arguments.

Usage::

    python -m batchgen bench --json            # the full benchmark (minutes on a 2-core CPU)
    python -m batchgen bench --quick --json    # a tiny model, for tests
    python -m batchgen bench --model DIR --json   # your checkpoint's weights and shape, random prompts
    python -m batchgen bench --dtype bfloat16 --json   # both systems in bf16 (the default on CUDA)
    python -m batchgen bench --pipeline --skip-hf --json   # + 1,000 prompts as Ray jobs, 1 and 2 replicas
    python -m batchgen bench --cpu-matmul blas --json   # batchgen's CPU matmuls through MKL, as transformers'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from batchgen import ops
from batchgen.model import ModelArgs, Transformer, count_parameters

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


def build_model(args: ModelArgs, seed: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A randomly initialised model (PyTorch's default init), identical for a given seed."""
    torch.manual_seed(seed)
    return Transformer(args).to(device=device, dtype=dtype).eval()


def build_hf(model: Transformer, device: torch.device, dtype: torch.dtype) -> Any:
    """``LlamaForCausalLM`` holding exactly ``model``'s weights (via batchgen's HF writer)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from batchgen.checkpoint import save_hf

    hf_logging.disable_progress_bar()  # a progress bar on stderr for a local file is noise
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as tmp:
        save_hf(model.state_dict(), model.args, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp)
    hf = hf.to(device=device, dtype=dtype).eval()
    # ignore_eos: HF must run every row to max_new_tokens, as the engine does.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineSystem:
    """batchgen's engine: all requests submitted at once, one continuous batch.

    A system under test is anything with ``run() -> tokens per request`` and ``info() -> dict``.
    """

    def __init__(self, model: Transformer, wl: Workload, device: torch.device,
                 max_num_seqs: int = MAX_NUM_SEQS, cuda_graphs: Optional[bool] = None,
                 compile_decode: bool = False) -> None:
        from batchgen.engine import LLM, SamplingParams

        self.model, self.wl, self.compile_decode = model, wl, compile_decode
        # KV is sized for max_num_seqs of the workload's longest request (the jobs' default).
        self.llm = LLM(model=model, device=str(device), max_model_len=wl.max_total_len,
                       max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs, compile_decode=compile_decode)
        self.params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in wl.max_tokens]
        # Warm-up: first calls pay for allocator growth and kernel selection. With graphs, the
        # whole workload once, so that every graph it needs is recorded before the timing.
        if self.llm.runner.graphs is not None:
            self.run()
        else:
            warm = wl.prompts[:4]
            self.llm.generate(warm, [SamplingParams(max_tokens=4, ignore_eos=True)] * len(warm))

    def run(self) -> list[list[int]]:
        return [o.token_ids for o in self.llm.generate(self.wl.prompts, self.params)]

    def info(self) -> dict[str, Any]:
        return {"kv_cache_bytes": self.llm.kv_cache.nbytes, "kv_cache_tokens": self.llm.kv_cache_tokens,
                "preemptions": self.llm.scheduler.num_preemptions, "cuda_graphs": self.llm.runner.graphs is not None,
                "compile_decode": self.llm.runner.graphs is not None and self.compile_decode}


class HFSystem:
    """``generate`` in input-order batches, left-padded, each to its batch's longest request."""

    def __init__(self, hf: Any, wl: Workload, batch_size: int, device: torch.device) -> None:
        self.hf, self.wl, self.batch_size, self.device = hf, wl, batch_size, device
        if device.type == "cuda":
            # Every new KV length is a new attention shape, which costs a kernel plan the first
            # time: on an H100 a first run takes 11.5 s, later ones 2.3-3.0 s.
            self.run()
        else:
            self._batch(wl.prompts[:2], 4)

    def _batch(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.hf.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               do_sample=False, max_new_tokens=max_new)
        return out[:, width:].tolist()

    def run(self) -> list[list[int]]:
        tokens: list[list[int]] = []
        for s in range(0, len(self.wl.prompts), self.batch_size):
            want = self.wl.max_tokens[s:s + self.batch_size]
            rows = self._batch(self.wl.prompts[s:s + self.batch_size], max(want))
            tokens.extend(row[:n] for row, n in zip(rows, want))  # only what each asked for
        return tokens

    def info(self) -> dict[str, Any]:
        return {"hf_attn_implementation": self.hf.config._attn_implementation}


def timed_run(system: Any, device: torch.device, result: RunResult) -> None:
    """One timed ``system.run()`` (wall time, prefill included) appended to ``result``."""
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        result.tokens = system.run()
        _sync(device)
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
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def measure_bandwidth_gbps(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Best memory copy rate (bytes read + written per second) over a buffer of ``nbytes``."""
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'cpu'}, {os.cpu_count()} logical cores"


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The ``bench`` options, for ``batchgen bench`` and ``python -m batchgen.bench``."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--prompts", type=int, default=None,
                   help="number of requests (default 64; 1000 with --pipeline)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--hf-batch", type=int, default=32, help="transformers batch size (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the workload")
    p.add_argument("--skip-hf", action="store_true", help="time batchgen only (no speedup, no token check)")
    p.add_argument("--quick", action="store_true", help="tiny model and short requests (for tests)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a checkpoint directory (Meta or HF layout) to bench instead of the random model; "
                        "transformers gets the same weights")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per system; medians are reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both systems (default: torch's, one per core)")
    p.add_argument("--pipeline", action="store_true",
                   help="also run the workload as a Ray job (Parquet in and out) at each --replicas count")
    p.add_argument("--replicas", default="1,2", help="replica counts for --pipeline (default 1,2)")
    p.add_argument("--shard-rows", type=int, default=100, help="rows per shard for --pipeline (default 100)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations of both systems (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--gpu-extras", action=argparse.BooleanOptionalAction, default=None,
                   help="single-stream decode of a 7B-shaped model vs HBM bandwidth, eager and from CUDA "
                        "graphs (default: on CUDA, when the GPU has room for it; --gpu-extras insists, "
                        "--no-gpu-extras skips it)")
    p.add_argument("--eager", action="store_true",
                   help="CUDA: batchgen runs every step eagerly instead of replaying decode steps from CUDA graphs")
    p.add_argument("--cpu-matmul", choices=("onednn", "blas"), default=None,
                   help="CPU fp32: batchgen's matmuls through oneDNN (the default where available) or "
                        "PyTorch's BLAS (MKL), as transformers'")
    p.add_argument("--compile-decode", action="store_true",
                   help="CUDA: batchgen compiles its replayed decode steps with torch.compile "
                        "(with --gpu-extras, also single-stream)")


def _validate(args: argparse.Namespace) -> Optional[str]:
    for name in ("prompts", "hf_batch", "repeat", "threads", "shard_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            return f"--device {args.device!r}: {e}"
        if dev.type == "cuda" and not torch.cuda.is_available():
            return f"--device {args.device}: CUDA is not available here"
        if dev.type not in ("cpu", "cuda"):
            return f"--device {args.device}: only cpu and cuda are supported"
    try:
        if min(int(n) for n in args.replicas.split(",")) < 1:
            raise ValueError
    except ValueError:
        return f"--replicas must be a comma-separated list of integers >= 1, got {args.replicas!r}"
    for flag in ("gpu_extras", "compile_decode"):
        if getattr(args, flag) and not (torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")):
            return f"--{flag.replace('_', '-')} needs a CUDA device"
    if args.cpu_matmul == "onednn" and not ops.onednn_linear_available():
        return "--cpu-matmul onednn: this PyTorch build has no oneDNN inner product"
    if args.compile_decode and args.eager:
        return "--compile-decode compiles the replayed steps, which --eager turns off"
    return None


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``add_bench_args`` options; return the exit code."""
    error = _validate(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_matmul:  # back to what it was once the bench ends
        with ops.cpu_matmul(args.cpu_matmul):
            return run_bench(argparse.Namespace(**{**vars(args), "cpu_matmul": None}))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    lens = (4, 24) if args.quick else (8, 128)
    if args.model:
        from batchgen.checkpoint import CheckpointError, load_model

        try:
            model = load_model(args.model, dtype=dtype, device=device)
        except CheckpointError as e:
            print(f"error: --model: {e}", file=sys.stderr)
            return 2
        if 2 * lens[1] > model.args.max_seq_len:
            print(f"error: --model {args.model}: the workload's requests reach {2 * lens[1]} tokens, past the "
                  f"model's max_seq_len {model.args.max_seq_len}", file=sys.stderr)
            return 2
    else:
        model = build_model(QUICK_ARGS if args.quick else BENCH_ARGS, args.seed, device, dtype)
    margs = model.args
    n_prompts = args.prompts or (1000 if args.pipeline else 64)
    wl = make_workload(n_prompts, margs.vocab_size, args.seed, lens, lens)
    if args.pipeline:
        from batchgen.bench_pipeline import pipeline_workload

        wl = pipeline_workload(wl)  # what a job's tokenizer makes of the prompt texts

    hf = None if args.skip_hf else build_hf(model, device, dtype)
    peak = measure_peak_gflops(device, dtype, n=(512 if args.quick else 4096) * (2 if device.type == "cuda" else 1))
    bandwidth = measure_bandwidth_gbps(device, (16 if args.quick else 1024) << 20)

    engine = EngineSystem(model, wl, device, cuda_graphs=False if args.eager else None,
                          compile_decode=args.compile_decode)
    systems = [(engine, RunResult(tokens=[]))]
    if hf is not None:
        systems.append((HFSystem(hf, wl, args.hf_batch, device), RunResult(tokens=[])))
    with ExitStack() as stack:
        jobs = None
        if args.pipeline:
            from batchgen.bench_pipeline import pipeline_bench

            jobs = stack.enter_context(pipeline_bench(model, wl, [int(n) for n in args.replicas.split(",")],
                                                      args.shard_rows, MAX_NUM_SEQS))
        # Alternate the systems (and the rounds of jobs): on a shared machine the load drifts,
        # and each then sees the same.
        for _ in range(args.repeat):
            for system, result in systems:
                timed_run(system, device, result)
            if jobs is not None:
                jobs.round()
    ours = systems[0][1]
    theirs = systems[1][1] if hf is not None else None

    useful_flops = sum(request_flops(margs, len(p), n) for p, n in zip(wl.prompts, wl.max_tokens))
    achieved = useful_flops / ours.median_s / 1e9
    traffic = min_traffic_bytes(margs, wl, dtype.itemsize)
    report: dict[str, Any] = {
        "tokens_per_s": wl.output_tokens / ours.median_s,
        "hf_tokens_per_s": wl.output_tokens / theirs.median_s if theirs else None,
        "speedup_vs_hf": theirs.median_s / ours.median_s if theirs else None,
        "peak_gflops": peak,
        "achieved_gflops": achieved,
        "roofline_fraction": achieved / peak,
        "useful_gflop": useful_flops / 1e9,
        "memory_gbps": bandwidth,
        "min_memory_gb": traffic / 1e9,
        "memory_roofline_fraction": traffic / ours.median_s / 1e9 / bandwidth,
        "batchgen_seconds": ours.seconds,
        "hf_seconds": theirs.seconds if theirs else None,
        "tokens_match_fraction": None,
        "divergences": None,
        **systems[0][0].info(),
        "hf_attn_implementation": systems[1][0].info()["hf_attn_implementation"] if theirs else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        # Both models, the engine's KV pool and either system's transients (CUDA only).
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "device": str(device),
        "machine": _machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_matmul": ops.current_cpu_matmul() if device.type == "cpu" else None,
        "torch_version": torch.__version__,
        "model_params": count_parameters(margs),
        "model": {"path": args.model, "dim": margs.dim, "n_layers": margs.n_layers, "n_heads": margs.n_heads,
                  "n_kv_heads": margs.n_kv_heads, "hidden_dim": margs.hidden_dim, "vocab_size": margs.vocab_size},
        "workload": {"prompts": len(wl.prompts), "prompt_tokens": sum(map(len, wl.prompts)),
                     "output_tokens": wl.output_tokens, "hf_batch": args.hf_batch, "seed": args.seed},
        "ok": True,
    }
    if theirs is not None:
        check = compare_tokens(model, hf, wl, ours.tokens, theirs.tokens, TIE_TOL[dtype])
        report.update(tokens_match_fraction=check["tokens_match_fraction"], divergences=check["divergences"],
                      tie_tolerance=check["tie_tolerance"], ok=check["ok"])
    if jobs is not None:
        report["pipeline"] = jobs.report(ours, TIE_TOL[dtype])
        report["ok"] = report["ok"] and all(r["ok"] for r in report["pipeline"])
    if device.type == "cuda" and args.gpu_extras is not False:
        del hf, model, systems, engine
        from batchgen.bench_gpu import gpu_extras

        report["gpu_extras"] = gpu_extras(device, dtype, args)

    _print_report(report, args.json)
    return 0 if report["ok"] else 1


def _print_report(r: dict[str, Any], as_json: bool) -> None:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m batchgen.bench [options]``."""
    parser = argparse.ArgumentParser(prog="batchgen bench", description=__doc__.splitlines()[0])
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
