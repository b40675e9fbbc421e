"""Decode steps replayed from CUDA graphs.

A decode step launches ~40 small kernels per layer. On a GPU the time to launch them from
Python exceeds the time they run: a 7B model at batch 1 streams its weights in ~5 ms on an H100
but takes ~22 ms to launch a step eagerly, and a 134M model's 64-row step is launch-bound too.
So each step shape is recorded once as a CUDA graph and replayed with one launch.

A graph replays fixed work on fixed memory, so a step must have fixed shapes: the batch is
padded up to a bucket (powers of two, and ``max_rows``) and the block tables to a power-of-two
width, and decode attention gathers each row's blocks (``attention.decode_gathered``) instead
of reading the pool in place up to its highest block in use. The inputs live in static buffers
that each step overwrites before the replay, and every graph leaves its logits in one static
buffer. Padding rows decode token 0 at position 0 into the null block 0, which the graph zeroes
again at its end, so block 0 stays the all-zero padding block.

The gather copies every row's context out of the pool (and SDPA's layout copies it again), so a
replayed step moves several times the KV bytes an eager one reads in place. Steps whose gathered K
would pass ``max_gather_bytes`` per layer (long contexts at big batches, where attention outweighs
the launches) run eagerly.

Steps with rows on an unmerged LoRA adapter also run eagerly (``ModelRunner.run``): the graphs hold
the base model only. The segments update that the eager path uses (``engine.adapters.lora_forward``)
has shapes that depend on which adapters a step holds, so it cannot be captured; the masked form
could be (its shapes depend on the row count alone) but does every adapter's work for every row, N
times the flops, and would need graphs per adapter set. Decode steps of base-only rows, and jobs
with a merged adapter, keep replaying. (Measuring the masked form inside graphs on a GPU is left
for when adapter-heavy GPU jobs are benched.)
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from batchgen.engine.attention import AttentionMetadata, PagedAttention, batch_buckets
from batchgen.engine.kv_cache import KVCache
from batchgen.engine.flex import FlexBackend, flex_decode_logits
from batchgen.model import Transformer

#: Largest gathered K (as much again for V) of one layer in a replayed step. Measured with a 7B
#: model on an H100 (bench/NOTES.md, "GPU"): at 4-16 rows replayed steps beat eager ones by
#: 1.2-2.2x up to this size; at 64 rows, where eager steps are no longer launch-bound, the two
#: tie at 64-128 MiB and replaying loses past it.
MAX_GATHER_BYTES = 128 << 20

#: ``capture(fn)`` records ``fn`` (no arguments, returns a tensor) and returns ``(replay, out)``:
#: ``replay()`` runs the recorded work again, leaving the result in ``out``.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def cuda_capture(pool: list) -> Capture:
    """Record with ``torch.cuda.CUDAGraph``; the graphs share one memory pool (held in ``pool``)."""

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool[0] if pool else None):
            out = fn()
        if not pool:
            pool.append(graph.pool())
        return graph.replay, out

    return capture


def decode_logits(model: Transformer, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] (fp32) of a decode step that reads its blocks gathered (no ``block_owner``).

    Every input is a tensor argument, so ``torch.compile(decode_logits, dynamic=True)`` compiles
    once for all batch sizes and table widths instead of once per graph.
    """
    metadata = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=tables, context_lens=context_lens)
    return model.compute_logits(model(ids, positions, PagedAttention(cache, metadata)))


def eager_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for :func:`cuda_capture` with a graph's contract (the same function, the same
    output tensor, inputs read from the static buffers), for devices without graphs: tests."""
    out = fn().clone()
    return (lambda: out.copy_(fn())), out


class DecodeGraphs:
    """Replays padded decode steps of up to ``max_rows`` rows; one graph per (batch bucket, table
    width) pair, recorded the first time that pair is needed."""

    def __init__(self, model: Transformer, cache: KVCache, max_model_len: int, max_rows: int,
                 device: torch.device, capture: Optional[Capture] = None,
                 max_gather_bytes: int = MAX_GATHER_BYTES, compile_decode: bool = False,
                 flex: Optional[FlexBackend] = None) -> None:
        self.model = model
        self.cache = cache
        block_size = cache.block_size
        # Compiling fuses the step's small kernels (norms, RoPE, casts); see bench/NOTES.md, "GPU".
        self.forward = decode_logits
        self.flex = flex
        if flex is not None:
            # Attention reads the pool in place (engine/flex.py): no gather, hence no cap, and
            # one table width (the block mask's) so that a graph per batch bucket serves all.
            self.forward = functools.partial(flex_decode_logits, backend=flex)
            max_gather_bytes = 1 << 62
        if compile_decode:
            # The pools never change shape; left dynamic, their head count would reach SDPA's
            # enable_gqa as a symbolic bool, which breaks the graph at every layer.
            for pool in (*cache.k, *cache.v):
                torch._dynamo.mark_static(pool)
            self.forward = torch.compile(self.forward, dynamic=True)
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = batch_buckets(max_rows)
        self.capture = capture or cuda_capture([])
        pool = cache.k[0]  # [num_blocks, kv_heads, block_size, head_dim]
        self.max_row_blocks = max_gather_bytes // (pool[0].numel() * pool.element_size())
        n = max_rows
        # Static inputs: every replay reads these very tensors.
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, self.max_blocks, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.long, device=device)
        # Every graph writes its logits here, so the graphs hold no outputs of their own.
        self.logits = torch.empty(n, model.args.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _width(self, blocks: int) -> int:
        if self.flex is not None:
            return self.max_blocks
        w = 1
        while w < blocks:
            w *= 2
        return min(w, self.max_blocks)

    def fits(self, rows: int, blocks: int) -> bool:
        """Whether a decode step of ``rows`` rows, the longest holding ``blocks`` blocks, replays."""
        return rows <= self.buckets[-1] and self._bucket(rows) * self._width(blocks) <= self.max_row_blocks

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, vocab] (fp32) of one decode step: each row's last token ``ids``, its
        ``positions``, the cache ``slots`` its K/V go to and its block ``tables``.

        The result is a view of the graph's output: read it before the next call.
        """
        B = len(ids)
        bucket = self._bucket(B)
        width = self._width(max(len(t) for t in tables))
        pad = bucket - B
        padded = [t + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad
        # One host-to-device copy per buffer; padding rows decode token 0 at position 0 in slot 0.
        self.ids[:bucket].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:bucket].copy_(torch.tensor(slots + [0] * pad), non_blocking=True)
        self.context_lens[:bucket].copy_(torch.tensor([p + 1 for p in positions] + [1] * pad), non_blocking=True)
        self.tables[:bucket, :width].copy_(torch.tensor(padded), non_blocking=True)
        key = (bucket, width)
        if key not in self.graphs:
            self.graphs[key] = self.capture(self._step_fn(bucket, width))
        replay, out = self.graphs[key]
        replay()
        return out[:B]

    def _step_fn(self, bucket: int, width: int) -> Callable[[], torch.Tensor]:
        model, cache, forward, out = self.model, self.cache, self.forward, self.logits[:bucket]
        inputs = (self.ids[:bucket], self.positions[:bucket], self.slots[:bucket],
                  self.tables[:bucket, :width], self.context_lens[:bucket])

        def step() -> torch.Tensor:
            out.copy_(forward(model, cache, *inputs))  # [bucket, vocab]
            cache.zero_null_block()  # padding rows wrote into it
            return out

        return step
