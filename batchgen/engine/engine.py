"""The engine loop: admit requests, schedule a step, run it, finish what is done.

Usage::

    llm = LLM("/models/llama-2-7b")
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from batchgen.engine.graphs import DecodeGraphs
from batchgen.engine.kv_cache import BlockManager, allocate_kv_cache, kv_blocks_for_budget
from batchgen.engine.request import CompletionOutput, Request, SamplingParams
from batchgen.engine.runner import ModelRunner
from batchgen.engine.scheduler import Scheduler
from batchgen.model import Transformer, default_device
from batchgen.tokenizer import IncrementalDecoder, StopStringMatcher, Tokenizer, load_tokenizer

Prompt = Union[str, Sequence[int]]

# LLaMA's </s>; used when a model ships no tokenizer.
DEFAULT_EOS_ID = 2


def default_kv_cache_bytes(device: torch.device) -> int:
    """A budget for the KV cache when the caller gives none.

    GPU: 90% of the memory still free once weights are loaded. CPU: 2 GiB, which holds
    thousands of tokens for models that are practical on a CPU at all.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return 2 << 30


class LLM:
    """A model, its tokenizer, a paged KV cache and the continuous-batching loop around them."""

    def __init__(self, model_dir: Optional[Union[str, Path]] = None, *, model: Optional[Transformer] = None,
                 tokenizer: Optional[Tokenizer] = None, dtype: str = "auto", device: Optional[str] = None,
                 kv_cache_bytes: Optional[int] = None, num_kv_blocks: Optional[int] = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: Optional[int] = None, block_size: int = 16,
                 max_model_len: Optional[int] = None, world_size: int = 1, rank: int = 0,
                 cuda_graphs: Optional[bool] = None, compile_decode: bool = False,
                 prefix_caching: bool = True) -> None:
        """Load ``model_dir`` (Meta or HF layout) or wrap an already built ``model``.

        The KV cache holds ``num_kv_blocks`` blocks of ``block_size`` tokens when given (a
        tensor-parallel leader passes what every rank agreed on); otherwise as many as
        ``kv_cache_bytes`` hold (default :func:`default_kv_cache_bytes`), never more than
        ``max_num_seqs`` full-length sequences use (``kv_cache.kv_blocks_for_budget``).

        ``max_model_len`` sets the context length (default: the checkpoint's ``max_seq_len``).
        ``cuda_graphs`` replays decode steps from CUDA graphs (see ``batchgen.engine.graphs``);
        by default on when the engine runs on one CUDA device (not tensor-parallel).
        ``compile_decode`` compiles those replayed steps with ``torch.compile`` (a prototype made
        them 20-40 % faster on an H100 for about a minute of compiling; see bench/NOTES.md). Where
        no step replays it does nothing.
        ``prefix_caching`` keeps full KV blocks indexed by content after their requests finish,
        so that requests sharing a prefix (a template) prefill it once (``kv_cache.BlockManager``).
        """
        self.device = torch.device(device) if device else default_device()
        if model is None:
            if model_dir is None:
                raise ValueError("give a model directory or a model")
            from batchgen.checkpoint import load_model

            model = load_model(model_dir, dtype=dtype, device=self.device, world_size=world_size, rank=rank)
            if tokenizer is None:
                tokenizer = load_tokenizer(model_dir)
        on = next(model.parameters()).device
        if on.type != self.device.type or (self.device.index is not None and on != self.device):
            raise ValueError(f"the model's weights are on {on} but the engine runs on {self.device}: "
                             f"move the model there first (model.to({str(self.device)!r}))")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else DEFAULT_EOS_ID
        if max_model_len:
            # Meta's params.json records no context length (2048 is assumed): let the job set it.
            model.set_max_seq_len(max_model_len)
        self.max_model_len = model.args.max_seq_len
        cache_dtype = next(model.parameters()).dtype

        if num_kv_blocks is None:
            budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(self.device)
            num_kv_blocks = kv_blocks_for_budget(model, budget, block_size, max_num_seqs, self.max_model_len, cache_dtype)
        elif num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
        self.kv_cache = allocate_kv_cache(model, num_kv_blocks, block_size, cache_dtype, self.device)
        self.blocks = BlockManager(num_kv_blocks, block_size, prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens or max(self.max_model_len, 2048))
        graphs = None
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and world_size == 1
        if cuda_graphs:
            if self.device.type != "cuda" or world_size > 1:
                raise ValueError(f"cuda_graphs needs one CUDA device, not {self.device} with world_size={world_size}")
            graphs = DecodeGraphs(model, self.kv_cache, self.max_model_len, max_num_seqs, self.device,
                                  compile_decode=compile_decode)
        self.runner = ModelRunner(model, self.kv_cache, self.blocks, self.device, graphs)
        self._ids = itertools.count()
        self._streams: dict[str, tuple[IncrementalDecoder, Optional[StopStringMatcher]]] = {}
        self._finished: list[CompletionOutput] = []

    @property
    def max_num_seqs(self) -> int:
        """How many requests run at once at most (the scheduler's slots)."""
        return self.scheduler.max_num_seqs

    @property
    def kv_cache_tokens(self) -> int:
        """How many tokens the KV cache holds in all."""
        return self.blocks.num_blocks * self.blocks.block_size

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: Optional[str] = None) -> str:
        """Queue a prompt (text, or token ids including any BOS). Bad prompts finish at once as errors."""
        rid = request_id if request_id is not None else str(next(self._ids))
        error = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                error = "this model has no tokenizer.model: give prompt token ids"
                ids: list[int] = []
            else:
                ids = self.tokenizer.encode(prompt, bos=True)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.args.vocab_size
        if error is None and not ids:
            error = "empty prompt"
        elif error is None and any(t < 0 or t >= vocab for t in ids):
            error = f"prompt token id out of range [0, {vocab})"
        elif error is None and len(ids) >= self.max_model_len:
            if params.truncate_prompt:
                keep = max(1, self.max_model_len - params.max_tokens)
                ids = ids[-keep:]
            else:
                error = f"prompt_too_long: {len(ids)} tokens, the context holds {self.max_model_len}"
        req = Request(rid, ids, params, self.max_model_len, self.device)
        if error is None and self.blocks.blocks_needed(req.max_total_len) > self.blocks.num_blocks:
            error = f"prompt_too_long: {req.max_total_len} tokens do not fit the KV cache ({self.kv_cache_tokens} tokens)"
        if error is not None:
            req.finish_reason, req.error = "error", error
            self._finished.append(req.to_output())
            return rid
        if self.tokenizer is not None:
            matcher = StopStringMatcher(params.stop) if params.stop else None
            self._streams[rid] = (IncrementalDecoder(self.tokenizer), matcher)
        self.scheduler.add(req)
        return rid

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop these requests, queued, running or finished but not yet returned, and free their
        blocks (a shard given up while others keep running)."""
        drop = set(request_ids)
        self.scheduler.abort(drop)
        for rid in drop:
            self._streams.pop(rid, None)
        self._finished = [o for o in self._finished if o.request_id not in drop]

    def abort_all(self) -> None:
        """Drop every queued and running request and free their blocks (an abandoned shard)."""
        self.scheduler.abort_all()
        self._streams.clear()
        self._finished = []

    @property
    def num_waiting(self) -> int:
        """Requests queued but not admitted yet: a caller feeding the engine adds more when this is 0."""
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished)

    def step(self) -> list[CompletionOutput]:
        """Run one scheduled step; return the requests that finished (in any order)."""
        decode, prefill = self.scheduler.schedule()
        reqs = decode + prefill
        if reqs:
            # Keep the blocks in use packed at the low ids (decode attention reads up to the top one).
            moves = self.blocks.compact(self.scheduler.running)
            tokens, logprobs = self.runner.run(decode, prefill, moves)
            for i, (req, tok) in enumerate(zip(reqs, tokens)):
                req.token_ids.append(tok)
                if req.params.logprobs and logprobs is not None:
                    req.logprobs.append(logprobs[i])
                self._check_finished(req, tok)
        done, self._finished = self._finished, []
        return done

    def _check_finished(self, req: Request, tok: int) -> None:
        p = req.params
        reason = None
        if (tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            # The stop token is generated but, like EOS in every reference, not part of the text.
            reason = "stop"
        stream = self._streams.get(req.request_id)
        if stream is not None and reason is None:
            decoder, matcher = stream
            chunk = decoder.add(tok)
            if matcher is not None and matcher.feed(chunk) is not None:
                reason = "stop"
        if reason is None and len(req) >= req.max_total_len:
            reason = "length"
        if reason is None:
            return
        if stream is not None:
            decoder, matcher = stream
            tail = decoder.finish()  # bytes held back for an unfinished character
            if matcher is None:
                req.text = decoder.text
            else:
                if not matcher.stopped and tail and matcher.feed(tail) is not None:
                    reason = "stop"
                req.text = matcher.text
        req.finish_reason = reason
        self._streams.pop(req.request_id, None)
        self.scheduler.finish(req)
        self._finished.append(req.to_output())

    def generate(self, prompts: Sequence[Prompt], params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams()
                 ) -> list[CompletionOutput]:
        """Run all prompts to completion as one continuously batched job; outputs in input order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        order = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, CompletionOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id] = out
        return [results[rid] for rid in order]

