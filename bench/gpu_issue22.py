"""Issue 22's step-time probe: 7B-shaped decode steps against their bandwidth bound, per attention backend.

For each backend and each (rows, context) point: ``rows`` requests with ``context``-token prompts
are prefilled, then ``--steps`` decode steps of all rows together are timed (CUDA graphs on, the
engine's default). The bound of one step is the bytes it must read, the weights plus every row's
K/V up to its context, divided by the copy bandwidth measured on the same GPU in the same call.
Points whose KV cache does not fit the GPU's free memory are skipped, and say so.

    python3 bench/gpu_issue22.py --json > $OUT/issue22-steps.json

Prints one JSON object. Random weights (the 7B shape), bf16; no token checks here (tests/test_gpu.py
and the bench make those).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from batchgen.bench.core import QUICK_ARGS, measure_bandwidth_gbps, sync
from batchgen.engine import LLM, SamplingParams
from batchgen.model import ModelArgs, count_parameters, empty_model


def random_model(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    model = empty_model(args).to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def step_time(model: torch.nn.Module, backend: str, rows: int, context: int, steps: int,
              compile_decode: bool) -> float:
    """Seconds per decode step of ``rows`` rows at about ``context`` tokens (median of 3 runs of ``steps``)."""
    kv_tokens = rows * (context + 3 * steps + 16)
    args = model.args
    kv_bytes = kv_tokens * 2 * args.n_layers * args.n_kv_heads * (args.dim // args.n_heads) * model.output.weight.element_size()
    llm = LLM(model=model, device=str(next(model.parameters()).device), max_model_len=context + 4 * steps + 16, max_num_seqs=rows,
              kv_cache_bytes=kv_bytes, attention_backend=backend, compile_decode=compile_decode)
    g = torch.Generator().manual_seed(rows * 7919 + context)
    for _ in range(rows):
        prompt = torch.randint(3, args.vocab_size, (context,), generator=g).tolist()
        llm.add_request(prompt, SamplingParams(max_tokens=3 * steps + 8, ignore_eos=True))
    while llm.scheduler.waiting or any(r.num_cached == 0 for r in llm.scheduler.running):
        llm.step()  # prefill (and a few decode steps of the rows prefilled first)
    llm.step()  # every row decoding: this step records the bucket's graph
    times = []
    for _ in range(3):
        sync(llm.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.step()
        sync(llm.device)
        times.append((time.perf_counter() - t0) / steps)
    llm.abort_all()
    return sorted(times)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="64,16,128", help="the goal's 64 first, in case the time box ends the run")
    p.add_argument("--contexts", default="120,1000")
    p.add_argument("--backends", default="flex,default")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--compile-decode", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny fp32 model on the CPU: checks this script only")
    a = p.parse_args()
    dev, dtype = (torch.device("cpu"), torch.float32) if a.quick else (torch.device("cuda"), torch.bfloat16)
    args = QUICK_ARGS if a.quick else ModelArgs.from_preset("llama-2-7b")
    weight_bytes = count_parameters(args) * dtype.itemsize
    bw = measure_bandwidth_gbps(dev, (16 if a.quick else 2048) << 20)
    model = random_model(args, dtype, dev)
    kv_per_token = 2 * args.n_layers * args.n_kv_heads * (args.dim // args.n_heads) * dtype.itemsize
    report = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "copy_gbps": bw,
              "weight_bytes": weight_bytes, "points": []}
    for rows in map(int, a.rows.split(",")):
        for context in map(int, a.contexts.split(",")):
            for backend in a.backends.split(","):
                point = {"rows": rows, "context": context, "backend": backend}
                gc.collect()
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0] if dev.type == "cuda" else 1 << 40
                need = rows * (context + 4 * a.steps + 16) * kv_per_token + (4 << 30)
                if need > free:
                    point["skipped"] = f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                else:
                    t0 = time.perf_counter()
                    try:
                        s = step_time(model, backend, rows, context, a.steps, a.compile_decode)
                    except Exception as e:  # a backend failing on this GPU is a result too
                        point["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                    else:
                        # The timed steps run at contexts context+1.. context+3*steps; their mean:
                        read = weight_bytes + rows * (context + 1.5 * a.steps) * kv_per_token
                        bound = read / (bw * 1e9)
                        point.update(step_ms=s * 1e3, bound_ms=bound * 1e3, ratio_to_bound=s / bound,
                                     wall_s=time.perf_counter() - t0)
                report["points"].append(point)
                print(json.dumps(point), flush=True)
    print(json.dumps(report) if a.json else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
