"""Per-step cost of constrained-decoding masks (batchgen.engine.constraints) on the CPU.

``batchgen bench --masks [--tokenizer PATH] [--prompts 64]`` (see ``batchgen.bench.tasks``).

B rows (all constrained by a JSON schema, or half of them) walk through the schema, each step
picking the argmax of fresh random logits [B, V] under the mask (a uniform draw among the allowed
tokens, so rows sit at varied points of their documents). Per step it times, in milliseconds
(median over the steps):

* ``fill``: llguidance computing B bitmask rows, one after another (``ConstraintState.fill_mask``);
* ``apply``: the whole ``apply_masks`` call (fill + unpack + masked fill of the logits);
* ``apply_executor``: the same with the rows' masks computed on an ``llguidance.LLExecutor``;
* ``unpack_and_fill``: ``apply`` minus ``fill``: unpacking the bits and masking the logits;
* ``accept``: consuming the B sampled tokens.

The random logits and the argmax are not timed.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import llguidance
import torch

from batchgen.engine.constraints import (
    allocate_bitmask,
    apply_masks,
    compile_constraint,
    tokenizer_info,
)
from batchgen.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["toxic", "clean", "spam"]},
        "score": {"type": "integer", "minimum": -5, "maximum": 100},
        "flagged": {"type": "boolean"},
        "meta": {"type": "object", "properties": {"lang": {"enum": ["en", "fr"]}, "note": {"type": "string",
                                                                                        "maxLength": 40}},
                 "required": ["lang", "note"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["label", "score", "flagged", "meta", "tags"],
    "additionalProperties": False,
}


def run(tokenizer: Path, batch: int, steps: int, constrained_every: int, seed: int) -> dict[str, float]:
    info = tokenizer_info(Tokenizer(tokenizer))
    c = compile_constraint("json_schema", SCHEMA, info)
    executor = llguidance.LLExecutor()
    g = torch.Generator().manual_seed(seed)
    V = info.vocab_size
    states = [c.new_state() if i % constrained_every == 0 else None for i in range(batch)]
    times: dict[str, list[float]] = {k: [] for k in ("fill", "apply", "apply_executor", "unpack_and_fill", "accept")}
    for _ in range(steps):
        live = [s if s is not None and not s.is_terminated() else None for s in states]
        if not any(live):
            live = states = [c.new_state() if i % constrained_every == 0 else None for i in range(batch)]
        logits = torch.randn(batch, V, generator=g)
        spare = logits.clone()
        bm = allocate_bitmask(batch, info)
        t0 = time.perf_counter()
        for k, s in enumerate(live):
            if s is not None:
                s.fill_mask(bm, k)
        t1 = time.perf_counter()
        apply_masks(logits, live)
        t2 = time.perf_counter()
        apply_masks(spare, live, executor=executor)
        t3 = time.perf_counter()
        toks = logits.argmax(dim=-1).tolist()
        t6 = time.perf_counter()
        for s, t in zip(live, toks):
            if s is not None:
                s.accept(t)
        t7 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, (t2 - t1) - (t1 - t0), t7 - t6)):
            times[k].append(v * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def mask_cost(tokenizer: Path, batch: int = 64, steps: int = 40, seed: int = 0) -> dict[str, object]:
    """The mask timings with every row constrained and with every other row, as one dict."""
    out: dict[str, object] = {"batch": batch, "steps": steps, "torch_threads": torch.get_num_threads(),
                              "load_avg_before": os.getloadavg()[0], "llguidance": llguidance.__version__}
    out["all_rows_constrained_ms"] = run(tokenizer, batch, steps, 1, seed)
    out["half_rows_constrained_ms"] = run(tokenizer, batch, steps, 2, seed)
    out["load_avg_after"] = os.getloadavg()[0]
    return out
