"""``batchgen bench --classify`` and ``--masks``: classification and structured-output costs.

``--classify``: the same rows (random prompt ids on the bench model's random weights) three ways,
rows/s each: the engine classifying them (``SamplingParams.choices``: one prefill per row, the
multi-token choices' tokens side by side after the prompt), the engine generating 4 greedy tokens for them (what a
"generate a label and hope" job does), and transformers computing the same scores in batches of
``--hf-batch`` rows (every prompt + choice sequence, right-padded, one forward per batch); and,
as the floor no answer can beat, generating one token (the prompts' prefill alone). It
reports the largest difference between the engine's and transformers' scores as a check. Engine
times are medians of ``--repeat`` runs; transformers runs once. Two
prompt-length ranges: the bench workload's (32-96 tokens) and short rows (8-24 tokens, a tweet or
a spam message). Every engine run starts with an empty prefix cache: the runs share the prompts,
and a cache warmed by the previous run would make the later ones look faster.

``--masks``: the per-step cost of constrained-decoding masks (``batchgen.bench.masks``).

Both need a SentencePiece tokenizer whose ids fit the model (``--tokenizer``; default: the real
LLaMA tokenizer in ``../shared`` for the bench model, the demo model's with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from batchgen.bench.core import BENCH_ARGS, QUICK_ARGS, build_model, make_workload
from batchgen.engine import LLM, SamplingParams
from batchgen.tokenizer import Tokenizer

CHOICES_MULTI = ["toxic", "non-toxic", "spam"]  # 2-4 LLaMA tokens each: 5 branch tokens a row
CHOICES_SINGLE = ["yes", "no"]  # one LLaMA token each: the prefill is the whole answer

_REPO = Path(__file__).resolve().parents[2]


def default_tokenizer(quick: bool) -> Path:
    """The tokenizer the bench uses by default (see the module docstring)."""
    if quick:
        return _REPO / "batchgen" / "demo" / "model" / "tokenizer.model"
    return next((d / "tokenizers" / "llama" / "tokenizer.model" for d in (_REPO / "shared", _REPO.parent / "shared")
                 if (d / "tokenizers" / "llama" / "tokenizer.model").exists()),
                _REPO.parent / "shared" / "tokenizers" / "llama" / "tokenizer.model")


def hf_scores(hf: Any, prompts: list[list[int]], choice_ids: list[list[int]], batch: int) -> list[list[float]]:
    """Every row's choice scores (summed token log-probs) by transformers, ``batch`` rows per forward."""
    out: list[list[float]] = []
    device = next(hf.parameters()).device
    with torch.inference_mode():
        for b in range(0, len(prompts), batch):
            seqs = [p + c for p in prompts[b:b + batch] for c in choice_ids]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            lp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), dim=-1).cpu()
            k = 0
            for p in prompts[b:b + batch]:
                row = []
                for c in choice_ids:
                    pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
                    row.append(float(lp[k, pos, torch.tensor(c)].double().sum()))
                    k += 1
                out.append(row)
    return out


def _timed(fn: Any, repeat: int = 1) -> tuple[Any, float]:
    """``fn()``'s result and its median wall time over ``repeat`` runs."""
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def classify_bench(args: argparse.Namespace, tokenizer: Path) -> dict[str, Any]:
    """Rows/s of classification vs 4-token generation vs transformers' batched scores."""
    tok = Tokenizer(tokenizer)
    # The model's vocabulary is the tokenizer's: generated ids must decode.
    margs = dataclasses.replace(QUICK_ARGS if args.quick else BENCH_ARGS, vocab_size=tok.vocab_size)
    n = args.prompts or (16 if args.quick else 64)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(margs, args.seed, device, dtype)
    llm = LLM(model=model, tokenizer=tok, device=str(device), max_num_seqs=64)
    hf = None
    if not args.skip_hf:
        from batchgen.bench.systems import build_hf

        hf = build_hf(model, device, dtype)
    report: dict[str, Any] = {"model": "quick" if args.quick else "bench", "rows": n, "device": str(device),
                              "dtype": str(dtype).removeprefix("torch."),
                              "torch_threads": torch.get_num_threads(), "load_avg_before": os.getloadavg()[0]}
    llm.generate([[1, 5, 6, 7]] * 2, SamplingParams(max_tokens=2))  # warm-up

    def cold(params: SamplingParams, prompts: list[list[int]]) -> Any:
        llm.blocks.clear_prefix_cache()
        outs = llm.generate(prompts, params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return outs

    for span in ((8, 24),) if args.quick else ((32, 96), (8, 24)):
        wl = make_workload(n, tok.vocab_size, args.seed, span, (4, 4))
        prompts = [[1] + p[1:] for p in wl.prompts]
        part: dict[str, Any] = {"prompt_tokens": sum(map(len, prompts))}
        gen, t_gen = _timed(lambda: cold(SamplingParams(max_tokens=4, ignore_eos=True), prompts), args.repeat)
        assert all(o.ok for o in gen)
        part["generate_4_tokens_rows_per_s"] = round(n / t_gen, 2)
        # The floor of any answer: the prompt's prefill and one token (what single-token choices cost).
        _, t_one = _timed(lambda: cold(SamplingParams(max_tokens=1), prompts), args.repeat)
        part["generate_1_token_rows_per_s"] = round(n / t_one, 2)
        for name, choices in (("multi_token", CHOICES_MULTI), ("single_token", CHOICES_SINGLE)):
            outs, t = _timed(lambda: cold(SamplingParams(choices=choices), prompts), args.repeat)
            ids = [tok.encode(c, bos=False) for c in choices]
            entry: dict[str, Any] = {"choices": choices, "choice_tokens": [len(c) for c in ids],
                                     "engine_rows_per_s": round(n / t, 2),
                                     "vs_generate_4": round(t_gen / t, 2)}
            if hf is not None:
                ref, t_hf = _timed(lambda: hf_scores(hf, prompts, ids, args.hf_batch))
                entry["hf_rows_per_s"] = round(n / t_hf, 2)
                entry["max_abs_diff_vs_hf"] = max(abs(a - b) for o, r in zip(outs, ref)
                                                  for a, b in zip(o.label_logprobs, r))
            part[f"classify_{name}"] = entry
        report[f"prompts_{span[0]}_{span[1]}"] = part
    report["load_avg_after"] = os.getloadavg()[0]
    return report


def run_tasks(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """The ``--classify`` / ``--masks`` reports (None when neither was asked for)."""
    if not (args.classify or args.masks):
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Path(args.tokenizer) if args.tokenizer else default_tokenizer(args.quick)
    if not tokenizer.exists():
        raise ValueError(f"--tokenizer: {tokenizer} not found (the real LLaMA tokenizer lives in ../shared)")
    report: dict[str, Any] = {}
    if args.classify:
        report["classify"] = classify_bench(args, tokenizer)
    if args.masks:
        from batchgen.bench.masks import mask_cost

        if Tokenizer(tokenizer).vocab_size < 1000:
            raise ValueError("--masks wants a real vocabulary (the LLaMA tokenizer), not the demo's")
        report["masks"] = mask_cost(tokenizer, batch=args.prompts or 64, steps=10 if args.quick else 40,
                                    seed=args.seed)
    return report
