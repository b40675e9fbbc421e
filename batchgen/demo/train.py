"""Train the bundled demo model: a tiny LLaMA, built with batchgen's own model code.

    python -m batchgen.demo.train [--out DIR] [--steps N] [--seed S] [--threads T]

Generates a corpus of the synthetic task (:mod:`batchgen.demo.task`), trains a SentencePiece
tokenizer on it, trains the model on CPU, reports greedy exact-match accuracy on held-out
problems, and writes ``config.json`` + ``model.safetensors`` + ``tokenizer.model`` (HF layout).
Everything is seeded: two runs with the same arguments on one machine write identical files.
A different thread count changes float summation order, hence the last bits of the weights.

Last run, which wrote the artifacts in batchgen/demo/model/ (2-core CPU shared with other jobs):
    command:   python -m batchgen.demo.train          (defaults: 2400 steps x 64, seed 0, 1 thread)
    model:     836,736 parameters (dim 128, 4 layers, 4 heads, 2 KV heads), vocab 384
    wall time: 370 s (355 s of training, ~0.15 s a step)
    loss:      0.0010 (mean over the last 50 steps; 1.50 at step 100)
    held-out greedy exact match: 99.70% of 1,000 (add 98.80%, reverse 100%, sort 100%)
"""

from __future__ import annotations

import argparse
import io
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch
import torch.nn.functional as F

from batchgen.checkpoint_save import save_hf
from batchgen.demo.task import KINDS, kind_of, make_examples, score
from batchgen.model import ModelArgs, Transformer, count_parameters
from batchgen.tokenizer import Tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "model"
VOCAB_SIZE = 384  # every task word becomes one piece; the corpus supports at most ~428
TOKENIZER_EXAMPLES = 20_000  # (prompt, answer) pairs the tokenizer is trained on
BOS_ID, EOS_ID = 1, 2
PAD_ID = 0  # only fills positions the loss mask ignores, so any id would do
# Addition is the hardest kind (carries must be known before the first digit is written) and
# has the fewest answer tokens, so training sees twice as many of them.
TRAIN_MIX = {"add": 2.0, "reverse": 1.0, "sort": 1.0}


def model_args(vocab_size: int = VOCAB_SIZE) -> ModelArgs:
    """The demo model's shape: ~0.9M parameters, with GQA (2 KV heads for 4 query heads)."""
    return ModelArgs(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
        multiple_of=32, norm_eps=1e-5, max_seq_len=64,
    )


def train_tokenizer(sentences: Iterable[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """A LLaMA-style SentencePiece BPE model trained on ``sentences``; returns the model file's bytes.

    Same ids as LLaMA's (unk 0, bos 1, eos 2, no pad), byte fallback and split digits. One thread,
    every sentence, in order: with those settings the same corpus gives byte-identical output.
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    return buf.getvalue()


def encode_example(tok: Tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``BOS prompt answer EOS`` and the number of ids before the answer.

    Prompt and answer are encoded separately, as at inference time, where the pipeline encodes
    the prompt alone (with BOS) and the model continues it.
    """
    head = tok.encode(prompt, bos=True)
    return head + tok.encode(answer, bos=False) + [tok.eos_id], len(head)


def make_batch(encoded: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``inputs``/``targets`` [B, L] and a loss ``mask`` over answer and EOS targets."""
    L = max(len(ids) for ids, _ in encoded) - 1
    inputs = torch.full((len(encoded), L), PAD_ID, dtype=torch.long)
    targets = torch.full((len(encoded), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(encoded), L), dtype=torch.bool)
    for i, (ids, n_head) in enumerate(encoded):
        t = torch.tensor(ids)
        inputs[i, : len(ids) - 1] = t[:-1]
        targets[i, : len(ids) - 1] = t[1:]
        # Target j is token j+1: the answer starts at token n_head, i.e. at target n_head-1.
        mask[i, n_head - 1 : len(ids) - 1] = True
    return inputs, targets, mask


@torch.no_grad()
def greedy_complete(model: Transformer, prompts: Sequence[list[int]], eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (EOS excluded) of a batch of token-id prompts, using ``logits_full``.

    Right padding is safe for a causal model: a sequence's logits at position p see only its own
    tokens 0..p, so each sequence reads its next token at its own length.
    """
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((B, int(lengths.max()) + max_new_tokens), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    out: list[list[int]] = [[] for _ in range(B)]
    active = torch.ones(B, dtype=torch.bool)
    rows = torch.arange(B)
    for _ in range(max_new_tokens):
        logits = model.logits_full(tokens[:, : int(lengths.max())])
        nxt = logits[rows, lengths - 1].argmax(-1)
        for i in torch.nonzero(active).flatten().tolist():
            if int(nxt[i]) == eos_id:
                active[i] = False
            else:
                out[i].append(int(nxt[i]))
        if not active.any():
            break
        tokens[rows[active], lengths[active]] = nxt[active]
        lengths = lengths + active.long()
    return out


def evaluate(model: Transformer, tok: Tokenizer, examples: Sequence[tuple[str, str]],
             batch_size: int = 128) -> float:
    """Greedy exact-match accuracy of ``model`` on ``examples``."""
    model.eval()
    correct = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        prompts = [tok.encode(p, bos=True) for p, _ in chunk]
        outs = greedy_complete(model, prompts, tok.eos_id, max_new_tokens=24)
        correct += sum(score(p, tok.decode(o)) for (p, _), o in zip(chunk, outs))
    return correct / max(1, len(examples))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(args: ModelArgs, encoded: Sequence[tuple[list[int], int]], steps: int, batch_size: int,
                seed: int, peak_lr: float = 3e-3, log_every: int = 100) -> tuple[Transformer, float]:
    """Train a fresh model on ``encoded`` examples; returns it and the mean loss of the last 50 steps."""
    torch.manual_seed(seed)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.01)
    order = random.Random(seed)
    recent: list[float] = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = [encoded[order.randrange(len(encoded))] for _ in range(batch_size)]
        inputs, targets, mask = make_batch(batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=min(200, steps // 10 + 1))
        logits = model.logits_full(inputs)
        loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  {time.time() - t0:6.1f}s", flush=True)
    return model, sum(recent) / len(recent)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: train, evaluate, write the artifacts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (HF layout)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=1000, help="held-out problems to evaluate on")
    # One thread by default: results are bit-identical run to run only at a fixed thread count,
    # and on a shared CPU two threads are several times slower than one (they wait on each other).
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    opts = ap.parse_args(argv)

    torch.set_num_threads(opts.threads)
    t0 = time.time()
    train = make_examples(opts.steps * opts.batch_size, opts.seed, "train", TRAIN_MIX)
    # Its own draw, so that a short run (few steps) still has a corpus rich enough for the
    # vocabulary; the same seed makes it the training corpus's first pairs in a full run.
    sentences = [s for pair in make_examples(TOKENIZER_EXAMPLES, opts.seed, "train", TRAIN_MIX) for s in pair]
    sp_bytes = train_tokenizer(sentences)
    with tempfile.TemporaryDirectory() as tmp:
        # Loaded from a file, as the pipeline will, so training sees exactly the pipeline's ids.
        (Path(tmp) / "tokenizer.model").write_bytes(sp_bytes)
        tok = Tokenizer(Path(tmp) / "tokenizer.model")
    args = model_args(tok.vocab_size)
    print(f"tokenizer: {tok.vocab_size} pieces; model: {count_parameters(args):,} parameters")

    encoded = [encode_example(tok, p, a) for p, a in train]
    longest = max(len(ids) for ids, _ in encoded)
    if longest > args.max_seq_len:
        raise ValueError(f"a training example has {longest} tokens, over max_seq_len={args.max_seq_len}")
    model, final_loss = train_model(args, encoded, opts.steps, opts.batch_size, opts.seed)

    # Another seed than the demo's default held-out set (seed 0): the demo's accuracy is then
    # measured on prompts that no training choice was tuned on.
    heldout = make_examples(opts.eval, opts.seed + 1, "heldout")
    acc = evaluate(model, tok, heldout)
    per_kind = {k: evaluate(model, tok, [e for e in heldout if kind_of(e[0]) == k]) for k in KINDS}
    print(f"held-out greedy exact match: {acc:.2%} on {opts.eval} "
          f"({', '.join(f'{k} {a:.2%}' for k, a in per_kind.items())}); "
          f"final loss {final_loss:.4f}; wall {time.time() - t0:.0f}s")

    opts.out.mkdir(parents=True, exist_ok=True)
    save_hf(model.state_dict(), args, opts.out)
    (opts.out / "tokenizer.model").write_bytes(sp_bytes)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
