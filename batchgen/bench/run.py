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
    python -m batchgen bench --lora --skip-hf --repeat 3 --json   # + 4 unmerged LoRA adapters, 1 merged, vs base

The parts live beside this module: ``core`` (workload, timing, FLOPs, token check, report),
``systems`` (the engine and transformers), ``pipeline`` (``--pipeline``), ``gpu`` (``gpu_extras``),
``lora`` (``--lora``; ``lora_layer`` times the per-row LoRA forms of one layer) and ``matmul`` (``--cpu-matmul``).
"""

from __future__ import annotations

import argparse
import resource
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from batchgen.bench.core import (BENCH_ARGS, MAX_NUM_SEQS, QUICK_ARGS, TIE_TOL, RunResult, Workload, build_model,
                                 compare_tokens, machine, make_workload, templated_workload, measure_bandwidth_gbps, measure_peak_gflops,
                                 min_traffic_bytes, print_report, request_flops, timed_run)
from batchgen.ops import cpu_matmul, current_cpu_matmul, onednn_linear_available
from batchgen.bench.systems import EngineSystem, HFSystem, build_hf
from batchgen.model import Transformer, count_parameters


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
    p.add_argument("--classify", action="store_true",
                   help="instead: classification rows/s vs 4-token generation vs transformers' batched scores "
                        "(batchgen.bench.tasks)")
    p.add_argument("--masks", action="store_true",
                   help="instead: the per-step cost of constrained-decoding masks (batchgen.bench.masks)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.model for --classify/--masks (default: ../shared's LLaMA one)")
    p.add_argument("--attention-backend", choices=("default", "flex"), default="default",
                   help="batchgen's attention over the paged KV cache (LLM(attention_backend=...); with "
                        "--gpu-extras, also single-stream)")
    p.add_argument("--lora", action="store_true",
                   help="also time the workload with rows spread over 4 unmerged rank-16 LoRA adapters, and "
                        "with one merged adapter, against the base alone (batchgen/bench/lora.py)")
    p.add_argument("--workload", choices=("mixed", "templated"), default="mixed",
                   help="mixed: random prompts of mixed lengths; templated: every prompt shares a 384-token "
                        "prefix, then 16-64 tokens of its own, 16 output tokens (512 prompts by default), and "
                        "batchgen also runs without prefix caching for comparison")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="batchgen shares the KV blocks of common prompt prefixes (--no-prefix-caching: off)")
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
    if args.cpu_matmul == "onednn" and not onednn_linear_available():
        return "--cpu-matmul onednn: this PyTorch build has no oneDNN inner product"
    if args.compile_decode and args.eager:
        return "--compile-decode compiles the replayed steps, which --eager turns off"
    return None


class BadModel(Exception):
    """``--model`` cannot be benched (the message says why); the bench exits 2."""


@dataclass
class Setup:
    """What a bench run measures: the model (and transformers' copy), the workload, the device."""

    device: torch.device
    dtype: torch.dtype
    model: Transformer
    wl: Workload
    hf: Any  # LlamaForCausalLM, or None with --skip-hf


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``add_bench_args`` options; return the exit code."""
    error = _validate(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.classify or args.masks:
        import json

        from batchgen.bench.tasks import run_tasks

        try:
            report = run_tasks(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=None if args.json else 2))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    # Back to what it was once the bench ends; without --cpu-matmul the current choice stays.
    with cpu_matmul(args.cpu_matmul or current_cpu_matmul()):
        try:
            setup = _setup(args)
        except BadModel as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        device, dtype = setup.device, setup.dtype
        report = _measure(args, setup)
        del setup  # the single-stream run below needs the GPU memory the models held
        if device.type == "cuda" and args.gpu_extras is not False:
            from batchgen.bench.gpu import gpu_extras

            report["gpu_extras"] = gpu_extras(device, dtype, args)
    print_report(report, args.json)
    return 0 if report["ok"] else 1


def _setup(args: argparse.Namespace) -> Setup:
    """The device, dtype, model (random or ``--model``), workload and transformers' copy."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    lens = (4, 24) if args.quick else (8, 128)
    if args.model:
        model = _load_model(args.model, device, dtype, 2 * lens[1])
    else:
        model = build_model(QUICK_ARGS if args.quick else BENCH_ARGS, args.seed, device, dtype)
    if args.workload == "templated":
        # --quick: the same shape scaled to the tiny model's 128-token context.
        wl = templated_workload(args.prompts or (16 if args.quick else 512), model.args.vocab_size, args.seed,
                                *((48, (4, 16), 4) if args.quick else (384, (16, 64), 16)))
    else:
        n_prompts = args.prompts or (1000 if args.pipeline else 64)
        wl = make_workload(n_prompts, model.args.vocab_size, args.seed, lens, lens)
    if args.pipeline:
        from batchgen.bench.pipeline import pipeline_workload

        wl = pipeline_workload(wl)  # what a job's tokenizer makes of the prompt texts
    hf = None if args.skip_hf else build_hf(model, device, dtype)
    return Setup(device, dtype, model, wl, hf)


def _load_model(path: str, device: torch.device, dtype: torch.dtype, longest: int) -> Transformer:
    """The checkpoint at ``path``; :class:`BadModel` if it does not load or its context is shorter
    than the workload's ``longest`` request."""
    from batchgen.checkpoint import CheckpointError, load_model

    try:
        model = load_model(path, dtype=dtype, device=device)
    except CheckpointError as e:
        raise BadModel(f"--model: {e}") from None
    if longest > model.args.max_seq_len:
        raise BadModel(f"--model {path}: the workload's requests reach {longest} tokens, past the "
                       f"model's max_seq_len {model.args.max_seq_len}")
    return model


def _measure(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """Time every system (and the pipeline's jobs) and return the report, checks included."""
    device, wl = s.device, s.wl
    peak = measure_peak_gflops(device, s.dtype, n=(512 if args.quick else 4096) * (2 if device.type == "cuda" else 1))
    bandwidth = measure_bandwidth_gbps(device, (16 if args.quick else 1024) << 20)

    engine = EngineSystem(s.model, wl, device, cuda_graphs=False if args.eager else None,
                          compile_decode=args.compile_decode, attention_backend=args.attention_backend,
                          prefix_caching=args.prefix_caching)
    hf_system = HFSystem(s.hf, wl, args.hf_batch, device) if s.hf is not None else None
    ours = RunResult(tokens=[])
    theirs = RunResult(tokens=[]) if hf_system is not None else None
    systems: list[tuple[Any, RunResult]] = [(engine, ours)] + ([(hf_system, theirs)] if theirs else [])
    # Templated: the same engine without prefix caching, timed in the same rounds.
    cold_engine, cold = None, None
    if args.workload == "templated" and args.prefix_caching:
        cold_engine = EngineSystem(s.model, wl, device, cuda_graphs=False if args.eager else None,
                                   compile_decode=args.compile_decode, attention_backend=args.attention_backend,
                                   prefix_caching=False)
        cold = RunResult(tokens=[])
        systems.insert(1, (cold_engine, cold))
    with ExitStack() as stack:
        jobs = None
        if args.pipeline:
            from batchgen.bench.pipeline import pipeline_bench

            jobs = stack.enter_context(pipeline_bench(s.model, wl, [int(n) for n in args.replicas.split(",")],
                                                      args.shard_rows, MAX_NUM_SEQS))
        # Alternate the systems (and the rounds of jobs): on a shared machine the load drifts,
        # and each then sees the same.
        for _ in range(args.repeat):
            for system, result in systems:
                timed_run(system, device, result)
            if jobs is not None:
                jobs.round()


    report = _report(args, s, ours, theirs, peak, bandwidth,
                     {**engine.info(), "hf_attn_implementation": hf_system.info()["hf_attn_implementation"]
                      if hf_system is not None else None})
    report["workload"]["kind"] = args.workload
    if cold is not None:
        report["prefix_cache"] = {
            "tokens_per_s": wl.output_tokens / ours.median_s,
            "no_cache_tokens_per_s": wl.output_tokens / cold.median_s,
            "speedup": cold.median_s / ours.median_s,
            "no_cache_seconds": cold.seconds,
            "prefill_tokens_submitted": engine.prefill_submitted,
            "prefill_tokens_computed": engine.prefill_computed,
            "no_cache_prefill_tokens_computed": cold_engine.prefill_computed,
            "tokens_equal": cold.tokens == ours.tokens,
        }
        report["ok"] = report["ok"] and cold.tokens == ours.tokens
    tie = TIE_TOL[s.dtype]
    if theirs is not None:
        check = compare_tokens(s.model, s.hf, wl, ours.tokens, theirs.tokens, tie)
        report.update(tokens_match_fraction=check["tokens_match_fraction"], divergences=check["divergences"],
                      tie_tolerance=check["tie_tolerance"], ok=check["ok"])
    if args.lora:
        from batchgen.bench.lora import lora_bench

        report["lora"] = lora_bench(s.model, wl, device, args.repeat)
    if jobs is not None:
        report["pipeline"] = jobs.report(ours, tie)
        report["ok"] = report["ok"] and all(r["ok"] for r in report["pipeline"])
    return report


def _report(args: argparse.Namespace, s: Setup, ours: RunResult, theirs: Optional[RunResult], peak: float,
            bandwidth: float, systems_info: dict[str, Any]) -> dict[str, Any]:
    """The report's throughput, roofline, memory and machine fields (token checks not yet in)."""
    margs, wl, device = s.model.args, s.wl, s.device
    useful_flops = sum(request_flops(margs, len(p), n) for p, n in zip(wl.prompts, wl.max_tokens))
    achieved = useful_flops / ours.median_s / 1e9
    traffic = min_traffic_bytes(margs, wl, s.dtype.itemsize)
    return {
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
        **systems_info,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        # Both models, the engine's KV pool and either system's transients (CUDA only).
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "device": str(device),
        "machine": machine(device),
        "dtype": str(s.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_matmul": current_cpu_matmul() if device.type == "cpu" else None,
        "torch_version": torch.__version__,
        "model_params": count_parameters(margs),
        "model": {"path": args.model, "dim": margs.dim, "n_layers": margs.n_layers, "n_heads": margs.n_heads,
                  "n_kv_heads": margs.n_kv_heads, "hidden_dim": margs.hidden_dim, "vocab_size": margs.vocab_size},
        "workload": {"prompts": len(wl.prompts), "prompt_tokens": sum(map(len, wl.prompts)),
                     "output_tokens": wl.output_tokens, "hf_batch": args.hf_batch, "seed": args.seed},
        "ok": True,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m batchgen.bench [options]``."""
    parser = argparse.ArgumentParser(prog="batchgen bench", description=__doc__.splitlines()[0])
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))

