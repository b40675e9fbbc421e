"""Teach the bundled demo model a new trick with a LoRA adapter, using batchgen's own model code.

    python -m batchgen.demo.lora_train --out DIR [--steps N] [--rank R] [--seed S]

The new task, descending sort (``"desc: 5 1 3 ="`` -> ``"5 3 1"``), is one the bundled model
was never shown (it knows ascending ``sort:``). The base weights stay frozen; only rank-``r``
factors A and B of the seven projections of every layer train, and the result is written as a
PEFT adapter directory (:func:`batchgen.lora.save_adapter`) that batchgen and peft both read.

The adapted weights are formed as ``W + scale * B @ A`` for each step (for the model's fused
``wqkv``/``w13``, the parts' deltas stacked in the fused row order) and the model is called with
them through ``torch.func.functional_call``: exactly LoRA's function and gradients, with no
change to the model's modules.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from batchgen.checkpoint import load_args, load_model
from batchgen.demo.task import split_of
from batchgen.demo.train import encode_example, greedy_complete, lr_at, make_batch
from batchgen.lora import PROJECTIONS, LoraAdapter, LoraWeights, _shapes, save_adapter
from batchgen.model import Transformer
from batchgen.tokenizer import Tokenizer

DEMO_MODEL = Path(__file__).resolve().parent / "model"
# The model's fused weights and the adapter projections stacked in them, in row order.
_FUSED = {"attention.wqkv": ("wq", "wk", "wv"), "feed_forward.w13": ("w1", "w3")}


def desc_prompt(rng: random.Random) -> str:
    """A descending-sort problem over 3-7 digits (repeats allowed), like the base task's ``sort:``."""
    return "desc: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 7))) + " ="


def desc_answer(prompt: str) -> str:
    """The answer to a :func:`desc_prompt` problem: its digits, largest first."""
    digits = prompt.removeprefix("desc:").removesuffix("=").split()
    return " ".join(sorted(digits, reverse=True))


def desc_examples(n: int, seed: int, split: str) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``split`` (the same prompt-hash split as the base task's)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = desc_prompt(rng)
        if split_of(p) == split:
            out.append((p, desc_answer(p)))
    return out


def desc_accuracy(model: Transformer, tok: Tokenizer, examples: Sequence[tuple[str, str]]) -> float:
    """Greedy exact match on descending-sort ``examples``."""
    # train.evaluate scores with the base task's checker, which does not know "desc:".
    prompts = [tok.encode(p, bos=True) for p, _ in examples]
    outs = greedy_complete(model, prompts, tok.eos_id, max_new_tokens=24)
    return sum(tok.decode(o).strip() == a for (_, a), o in zip(examples, outs)) / max(1, len(examples))


def _init_factors(model: Transformer, rank: int, targets: Sequence[str], gen: torch.Generator
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's default init per (layer, projection): A Kaiming-uniform, B zero (the adapter
    starts as the identity). Shapes are the unfused projections', as an adapter stores them."""
    shapes = _shapes(model.args)
    factors = {}
    for layer in range(model.args.n_layers):
        for proj in PROJECTIONS:  # fixed order: the same seed draws the same factors
            if proj not in targets:
                continue
            out_f, in_f = shapes[proj]
            bound = 1 / math.sqrt(in_f)
            a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
            factors[(layer, proj)] = (a.requires_grad_(), torch.zeros(out_f, rank, requires_grad=True))
    return factors


def _adapted_weights(model: Transformer, factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                     scale: float) -> dict[str, torch.Tensor]:
    """The model's parameters with each adapted projection's ``scale * B @ A`` added, by the
    model's own (fused) names: a fused weight gets its parts' deltas stacked in its row order."""
    base = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for layer in range(model.args.n_layers):
        for fused, parts in _FUSED.items():
            if not any((layer, p) in factors for p in parts):
                continue
            name = f"layers.{layer}.{fused}.weight"
            rows = (model.layers[layer].attention if fused == "attention.wqkv" else model.layers[layer].feed_forward).fused_rows()
            w = base[name]
            deltas = [scale * (factors[(layer, p)][1] @ factors[(layer, p)][0]) if (layer, p) in factors
                      else w.new_zeros(rows[p][1] - rows[p][0], w.shape[1]) for p in parts]
            out[name] = w + torch.cat(deltas)
        for proj, module in (("wo", "attention.wo"), ("w2", "feed_forward.w2")):
            if (layer, proj) in factors:
                a, b = factors[(layer, proj)]
                out[f"layers.{layer}.{module}.weight"] = base[f"layers.{layer}.{module}.weight"] + scale * (b @ a)
    return out


def train_lora(model: Transformer, encoded: Sequence[tuple[list[int], int]], steps: int, *, rank: int = 8,
               alpha: float = 16.0, targets: Sequence[str] = PROJECTIONS, batch_size: int = 32, seed: int = 0,
               peak_lr: float = 3e-3, log_every: Optional[int] = 100, name: str = "desc") -> tuple[LoraAdapter, list[float]]:
    """Train a rank-``rank`` LoRA adapter on ``encoded`` examples with ``model`` frozen.

    Returns the adapter (Meta names and order, as :func:`batchgen.lora.load_adapter` gives) and
    the loss of every step.
    """
    if not 1 <= rank <= 64:
        raise ValueError(f"rank must be in [1, 64], got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    factors = _init_factors(model, rank, targets, gen)
    scale = alpha / rank
    params = [t for ab in factors.values() for t in ab]
    opt = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.0)
    order, losses = random.Random(seed), []
    model.train()
    t0 = time.time()
    for step in range(steps):
        inputs, targets_, mask = make_batch([encoded[order.randrange(len(encoded))] for _ in range(batch_size)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=min(50, steps // 10 + 1))
        weights = _adapted_weights(model, factors, scale)
        with torch.enable_grad():
            logits = _call(model, weights, inputs)
            loss = F.cross_entropy(logits[mask], targets_[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  {time.time() - t0:6.1f}s",
                  flush=True)
    model.eval()
    weights_out = {}
    for (layer, proj), (a, b) in factors.items():
        weights_out[(layer, proj)] = LoraWeights(a.detach().clone(), b.detach().clone(), scale)
    return LoraAdapter(name=name, source="batchgen.demo.lora_train", weights=weights_out), losses


def _call(model: Transformer, weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """``model.logits_full(inputs)`` with some parameters replaced by ``weights`` for the call."""
    class _Full(torch.nn.Module):  # functional_call runs forward(); logits_full is the training path
        def __init__(self, m: Transformer) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.logits_full(x)

    return torch.func.functional_call(_Full(model), {f"m.{k}": v for k, v in weights.items()}, (inputs,))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    tok = Tokenizer(opts.model / "tokenizer.model")
    model = load_model(opts.model, dtype="float32", device="cpu")
    train = [encode_example(tok, p, a) for p, a in desc_examples(20_000, opts.seed, "train")]
    held = desc_examples(500, opts.seed + 1, "heldout")
    print(f"base model on desc: {desc_accuracy(model, tok, held):.2%}")
    adapter, _ = train_lora(model, train, opts.steps, rank=opts.rank, seed=opts.seed)
    save_adapter(adapter, load_args(opts.model), opts.out)
    merged = load_model(opts.model, dtype="float32", device="cpu", adapters=[adapter])
    print(f"with the adapter on desc: {desc_accuracy(merged, tok, held):.2%}; wrote {opts.out}")


if __name__ == "__main__":
    main()
