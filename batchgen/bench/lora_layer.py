"""Per-row LoRA forms against the base matmuls of one layer, on the CPU (``python -m batchgen.bench.lora_layer``).

Not a timed test: a measurement for bench/NOTES.md. One decoder layer of the bench model (dim 768,
12 heads, FFN 2048, fp32): the base matmuls as the model runs them (q|k|v and w1|w3 fused, then wo
and w2) against the LoRA updates of all seven projections for rows spread over 4 adapters of
rank 16 (plus some base rows), in each :func:`batchgen.engine.adapters.lora_forward` form, the adapters
stacked with the same fusion; each update is added into a stand-in of its base output.

Rows are sorted by adapter, as the engine packs a step. Measured 2026-12-06 on the quiet 2-core
AMD EPYC, 2 torch threads, min of 20 reps, ms per layer (share of the base matmuls' time):

    rows   base   segments      grouped       masked        gathered
    16     2.44   0.84 (35 %)   0.91 (37 %)   0.95 (39 %)   3.09 (127 %)
    64     5.52   1.07 (19 %)   1.46 (26 %)   1.85 (34 %)   23.9 (432 %)
    256    17.7   2.02 (11 %)   2.82 (16 %)   5.72 (32 %)   155  (874 %)
    2048   146    8.06 (5.5 %)  14.1 (9.7 %)  49.1 (34 %)   1303 (895 %)

Segments (the engine's form) does the fewest flops and copies nothing; grouped copies each
adapter's rows out and back and multiplies the fused projections' block-diagonal B whole; masked
does every adapter's work for every row; gathered copies every row's factors. Small steps are
bound by per-op dispatch. These are matmuls only: a whole step (attention, norms, logits) adds
time to the base and not to the updates (bench/NOTES.md, "LoRA adapters").
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from batchgen.engine.adapters import LoraStack, lora_forward, lora_rows
from batchgen.lora import LoraAdapter, LoraWeights
from batchgen.model import ModelArgs, linear

BENCH_ARGS = ModelArgs(dim=768, n_layers=1, n_heads=12, hidden_dim=2048, vocab_size=32000)
FUSE = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}  # as the model runs them
METHODS = ("segments", "grouped", "masked", "gathered")


def _adapter(name: str, args: ModelArgs, r: int, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    q, ffn = args.n_heads * args.head_dim, args.hidden_dim
    shapes = {"wq": (q, args.dim), "wk": (q, args.dim), "wv": (q, args.dim), "wo": (args.dim, q),
              "w1": (ffn, args.dim), "w3": (ffn, args.dim), "w2": (args.dim, ffn)}
    return LoraAdapter(name, name, {(0, p): LoraWeights(torch.randn(r, i, generator=g) * 0.01,
                                                        torch.randn(o, r, generator=g) * 0.01, 2.0)
                                    for p, (o, i) in shapes.items()})


def measure(rows: int, n_adapters: int = 4, rank: int = 16, reps: int = 20, base_share: float = 0.2,
            seed: int = 0) -> dict[str, float]:
    """Milliseconds per layer (the minimum over ``reps``; each rep runs the base and every form
    back to back, so a busy machine slows them alike): base matmuls and each form's updates."""
    args = BENCH_ARGS
    g = torch.Generator().manual_seed(seed)
    d, f = args.dim, args.hidden_dim
    wqkv, wo = torch.randn(3 * d, d, generator=g), torch.randn(d, d, generator=g)
    w13, w2 = torch.randn(2 * f, d, generator=g), torch.randn(d, f, generator=g)
    x, h = torch.randn(rows, d, generator=g), torch.randn(rows, f, generator=g)
    stack = LoraStack([_adapter(f"a{i}", args, rank, i) for i in range(n_adapters)], args, fuse=FUSE)
    index = torch.randint(0, n_adapters, (rows,), generator=g)
    index[torch.rand(rows, generator=g) < base_share] = -1
    index = index.sort().values  # the engine packs a step's rows by adapter
    host = index.tolist()
    inputs = {"wqkv": x, "wo": x, "w13": x, "w2": h}
    # The engine adds each update into its base matmul's output: stand-ins of those outputs.
    outs = {"wqkv": torch.zeros(rows, 3 * d), "wo": torch.zeros(rows, d), "w13": torch.zeros(rows, 2 * f),
            "w2": torch.zeros(rows, d)}

    def base() -> None:
        linear(x, wqkv), linear(x, wo), linear(x, w13), linear(h, w2)

    def lora(method: str) -> Callable[[], None]:
        def run() -> None:
            r = lora_rows(index, n_adapters, host)  # once per step in the engine; counted per layer here
            for p, xin in inputs.items():
                lora_forward(xin, p, 0, r, stack, method=method, out=outs[p])  # type: ignore[arg-type]
        return run

    fns = {"base": base, **{m: lora(m) for m in METHODS}}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    out: dict[str, float] = {"rows": rows, "base_ms": min(times["base"]) * 1e3}
    for m in METHODS:
        out[f"{m}_ms"] = min(times[m]) * 1e3
        out[f"{m}_overhead"] = out[f"{m}_ms"] / out["base_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[64, 2048])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for rows in a.rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in measure(rows, reps=a.reps).items()}))


if __name__ == "__main__":
    main()
