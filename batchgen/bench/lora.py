"""``batchgen bench --lora``: what LoRA adapters cost a whole engine run, against the base, in one run.

Three engines on the same model and the same workload, timed in turn (``--repeat`` rounds, so a
shared machine's drifting load hits each alike):

* ``base``: no adapters;
* ``adapters``: every request on one of ``n`` unmerged adapters of rank ``rank`` on all seven
  projections, round-robin (all ``n`` in every step), plus every fifth request on the base;
* ``merged``: one such adapter merged into the weights (its cost should be nil).

Reported: tokens/s of each and the overhead of unmerged adapters (``adapters`` time / ``base``
time - 1). The layer-level forms behind the unmerged path are measured by
``python -m batchgen.bench.lora_layer``.
"""

from __future__ import annotations

from typing import Any

import torch

from batchgen.bench.core import MAX_NUM_SEQS, RunResult, Workload, timed_run
from batchgen.lora import PROJECTIONS, LoraAdapter, LoraWeights, _shapes, merge_into_state_dict
from batchgen.model import Transformer, fuse_weights, split_fused_weights


def random_adapter(name: str, model: Transformer, rank: int, seed: int) -> LoraAdapter:
    """A rank-``rank`` adapter on all seven projections of every layer (small random factors)."""
    g = torch.Generator().manual_seed(seed)
    ws = {(layer, p): LoraWeights(torch.randn(rank, i, generator=g) * 0.01, torch.randn(o, rank, generator=g) * 0.01, 2.0)
          for layer in range(model.args.n_layers) for p, (o, i) in _shapes(model.args).items() if p in PROJECTIONS}
    return LoraAdapter(name, f"bench/{name}", ws)


def merged_model(model: Transformer, adapter: LoraAdapter) -> Transformer:
    """A copy of ``model`` with ``adapter`` merged into its weights."""
    from batchgen.model import empty_model

    sd = merge_into_state_dict(split_fused_weights(model.state_dict(), model.args), adapter)
    out = empty_model(model.args)
    out.load_state_dict(fuse_weights(sd), assign=True)
    return out.eval()


class _Engine:
    def __init__(self, model: Transformer, wl: Workload, device: torch.device, adapters: dict[str, LoraAdapter],
                 names: list[str | None]) -> None:
        from batchgen.engine import LLM, SamplingParams

        self.wl = wl
        self.llm = LLM(model=model, device=str(device), max_model_len=wl.max_total_len, max_num_seqs=MAX_NUM_SEQS,
                       cuda_graphs=False, adapters=adapters or None)
        self.params = [SamplingParams(max_tokens=n, ignore_eos=True, adapter=a) for n, a in zip(wl.max_tokens, names)]
        self.llm.generate(wl.prompts[:4], [SamplingParams(max_tokens=4, ignore_eos=True)] * 4)  # warm-up

    def run(self) -> list[list[int]]:
        return [o.token_ids for o in self.llm.generate(self.wl.prompts, self.params)]


def lora_bench(model: Transformer, wl: Workload, device: torch.device, repeat: int, n_adapters: int = 4,
               rank: int = 16) -> dict[str, Any]:
    """Tokens/s of the base, of ``n_adapters`` unmerged rank-``rank`` adapters and of one merged."""
    adapters = {f"a{i}": random_adapter(f"a{i}", model, rank, 100 + i).to(dtype=next(model.parameters()).dtype)
                for i in range(n_adapters)}
    names: list[str | None] = [None if i % 5 == 4 else f"a{i % n_adapters}" for i in range(len(wl.prompts))]
    merged = merged_model(model, adapters["a0"].to(dtype=torch.float32))
    systems = {"base": _Engine(model, wl, device, {}, [None] * len(wl.prompts)),
               "adapters": _Engine(model, wl, device, adapters, names),
               "merged": _Engine(merged, wl, device, {}, [None] * len(wl.prompts))}
    results = {k: RunResult(tokens=[]) for k in systems}
    for _ in range(repeat):
        for k, system in systems.items():
            timed_run(system, device, results[k])
    tps = {k: wl.output_tokens / r.median_s for k, r in results.items()}
    return {"base_tokens_per_s": tps["base"], "adapters_tokens_per_s": tps["adapters"],
            "merged_tokens_per_s": tps["merged"],
            "adapters_overhead": results["adapters"].median_s / results["base"].median_s - 1,
            "merged_overhead": results["merged"].median_s / results["base"].median_s - 1,
            "seconds": {k: r.seconds for k, r in results.items()},
            "n_adapters": n_adapters, "rank": rank, "base_rows_share": 0.2,
            "adapter_nbytes": systems["adapters"].llm.lora.nbytes}


__all__ = ["lora_bench", "merged_model", "random_adapter"]
