"""The engine loop: admit requests, schedule a step, run it, finish what is done.

Usage::

    llm = LLM("/models/llama-2-7b")
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from batchgen.engine import classify
from batchgen.engine.classify import ChoiceChild, ChoiceRun
from batchgen.engine.constraints import ConstraintError, compile_constraint, tokenizer_info
from batchgen.engine.flex import ATTENTION_BACKENDS, FlexBackend
from batchgen.engine.adapters import AdapterSource, build_stack, load_adapters
from batchgen.engine.graphs import DecodeGraphs
from batchgen.engine.kv_cache import BlockManager, allocate_kv_cache, kv_blocks_for_budget
from batchgen.engine.request import CompletionOutput, Request, SamplingParams, Status
from batchgen.engine.runner import ModelRunner
from batchgen.engine.scheduler import Scheduler
from batchgen.limits import MAX_CONTEXT, max_prompt_bytes, prompt_too_long, text_too_long, truncate_prompt_ids
from batchgen.engine.scoring import encode_choices
from batchgen.model import Transformer, default_device
from batchgen.tokenizer import IncrementalDecoder, StopStringMatcher, Tokenizer, load_tokenizer

Prompt = Union[str, Sequence[int]]

# LLaMA's </s> and <s>; used when a model ships no tokenizer.
DEFAULT_EOS_ID = 2
DEFAULT_BOS_ID = 1


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
                 attention_backend: str = "default", adapters: Optional[Mapping[str, AdapterSource]] = None,
                 merge_adapter: bool = False, prefix_caching: bool = True) -> None:
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

        ``attention_backend``: ``"default"`` (``engine/attention.py``: reads the pool in place in
        eager steps, gathers it in replayed ones) or ``"flex"`` (``engine/flex.py``: FlexAttention
        reads the pool in place everywhere, replayed steps included, with no gather cap; compiled
        with ``torch.compile`` once per shape class, seconds to a minute each).
        ``adapters`` (name -> PEFT directory or :class:`batchgen.lora.LoraAdapter`) stay resident,
        unmerged: a request picks one by name (``SamplingParams.adapter`` or ``add_request(adapter=)``)
        and rows of different adapters share each step (``batchgen.engine.adapters``). With
        ``merge_adapter`` there must be exactly one, loaded from ``model_dir`` merged into the
        weights: every request then runs with it, at the base model's speed.

        ``prefix_caching`` keeps full KV blocks indexed by content after their requests finish,
        so that requests sharing a prefix (a template) prefill it once (``kv_cache.BlockManager``).
        """
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention_backend!r}")
        self.device = torch.device(device) if device else default_device()
        self.merged_adapter: Optional[str] = None
        if merge_adapter:
            if model is not None or model_dir is None or not adapters or len(adapters) != 1:
                raise ValueError("merge_adapter needs a model directory and exactly one adapter")
        if model is None:
            if model_dir is None:
                raise ValueError("give a model directory or a model")
            from batchgen.checkpoint import load_args, load_model

            merged = load_adapters(adapters, load_args(model_dir)) if merge_adapter and adapters else []
            model = load_model(model_dir, dtype=dtype, device=self.device, world_size=world_size, rank=rank,
                               adapters=merged)
            if merged:
                self.merged_adapter, adapters = merged[0].name, None
            if tokenizer is None:
                tokenizer = load_tokenizer(model_dir)
        on = next(model.parameters()).device
        if on.type != self.device.type or (self.device.index is not None and on != self.device):
            raise ValueError(f"the model's weights are on {on} but the engine runs on {self.device}: "
                             f"move the model there first (model.to({str(self.device)!r}))")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else DEFAULT_EOS_ID
        self.bos_id = tokenizer.bos_id if tokenizer is not None else DEFAULT_BOS_ID
        if max_model_len is not None and not 0 < max_model_len <= MAX_CONTEXT:
            raise ValueError(f"max_model_len must be in 1..{MAX_CONTEXT}, got {max_model_len}")
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
        flex = (FlexBackend(self.kv_cache, self.max_model_len, max_num_seqs)
                if attention_backend == "flex" else None)
        graphs = None
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and world_size == 1
        if cuda_graphs:
            if self.device.type != "cuda" or world_size > 1:
                raise ValueError(f"cuda_graphs needs one CUDA device, not {self.device} with world_size={world_size}")
            graphs = DecodeGraphs(model, self.kv_cache, self.max_model_len, max_num_seqs, self.device,
                                  compile_decode=compile_decode, flex=flex)
        self.lora = (build_stack(adapters, model.args, model.world_size, model.rank, cache_dtype, self.device)
                     if adapters else None)
        self.runner = ModelRunner(model, self.kv_cache, self.blocks, self.device, graphs, flex, self.lora)
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

    @property
    def adapter_names(self) -> list[str]:
        """The adapters requests may name (the merged one, or the resident unmerged ones)."""
        return [self.merged_adapter] if self.merged_adapter else (list(self.lora.names) if self.lora else [])

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: Optional[str] = None,
                    adapter: Optional[str] = None) -> str:
        """Queue a prompt (text, or token ids including any BOS). Bad prompts finish at once as errors.

        ``adapter`` (default ``params.adapter``) names the LoRA adapter to run it with; None or
        "" is the base model (or the merged adapter, with ``merge_adapter``). An unknown name
        makes the request an error.
        """
        rid = request_id if request_id is not None else str(next(self._ids))
        error = None
        ids: list[int] = []
        name = (adapter if adapter is not None else params.adapter) or None
        slot = -1
        if self.merged_adapter is not None:
            if name not in (None, self.merged_adapter):
                error = f"unknown adapter {name!r}; this engine runs {self.merged_adapter!r} merged"
            name = self.merged_adapter
        elif name is not None:
            if self.lora is None or name not in self.lora.names:
                error = f"unknown adapter {name!r}; known: {self.adapter_names}"
            else:
                slot = self.lora.slot(name)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                error = "this model has no tokenizer.model: give prompt token ids"
            elif len(prompt) > max_prompt_bytes(self.max_model_len):
                # Each character is at least a byte: never spend seconds tokenising what cannot fit.
                error = text_too_long(len(prompt), self.max_model_len)
            else:
                ids = self.tokenizer.encode(prompt, bos=True)
        else:
            ids = [int(t) for t in prompt]
        run: Optional[ChoiceRun] = None
        state = None
        if error is None and (params.choices is not None or params.constraint is not None):
            run, state, error = self._task_state(params)
        # A classification row needs room for its longest choice but the last token, not max_tokens.
        extra = classify.longest_choice(run) - 1 if run is not None else params.max_tokens
        vocab = self.model.args.vocab_size
        cut = 0
        if error is None and not ids:
            error = "empty prompt"
        elif any(t < 0 or t >= vocab for t in ids):
            error = f"prompt token id out of range [0, {vocab})"
        elif error is None and (len(ids) + extra > self.max_model_len if run is not None
                                else len(ids) >= self.max_model_len):
            if params.truncate_prompt:
                kept = truncate_prompt_ids(ids, self.max_model_len, extra, self.bos_id)
                ids, cut = kept, len(ids) - len(kept)
            elif run is not None and extra:
                error = (f"prompt_too_long: {len(ids)} tokens plus its longest choice's {extra} tokens but one, "
                         f"the context holds {self.max_model_len} (set input.truncate_prompt: true to keep "
                         "the last tokens)")
            else:
                error = prompt_too_long(len(ids), self.max_model_len)
        req = Request(rid, ids, params, self.max_model_len, self.device, adapter_id=name, lora_slot=slot)
        req.truncated_tokens = cut
        req.scoring, req.constraint_state = run, state
        if run is not None:
            req.max_total_len = len(ids) + max(1, extra)
            if error is None and self.runner.flex is None:
                # The prompt, then every multi-token choice's tokens but the last: one prefill.
                classify.add_branches(req, run)
        if error is None and self.blocks.blocks_needed(req.max_total_len) > self.blocks.num_blocks:
            what = (f"{req.max_total_len} tokens" if req.branch_starts is None else
                    f"{req.max_total_len} tokens (the prompt's {req.num_prompt_tokens} and its choices' "
                    f"{len(req.branch_starts)} side by side)")
            error = f"prompt_too_long: {what} do not fit the KV cache ({self.kv_cache_tokens} tokens)"
        if error is not None:
            req.finish_reason, req.error = "error", error
            self._finished.append(req.to_output())
            return rid
        if self.tokenizer is not None and run is None:
            # Stop strings would cut a constrained document: the grammar decides where it ends.
            matcher = StopStringMatcher(params.stop) if params.stop and state is None else None
            self._streams[rid] = (IncrementalDecoder(self.tokenizer), matcher)
        self.scheduler.add(req)
        return rid

    def _task_state(self, params: SamplingParams) -> tuple[Optional[ChoiceRun], object, Optional[str]]:
        """(classification state, constraint state, error) of a request with choices or a constraint."""
        if self.tokenizer is None:
            what = "classification (choices)" if params.choices is not None else "constrained decoding"
            return None, None, f"{what} needs the model's tokenizer.model"
        if params.choices is not None:
            try:
                choice_ids = encode_choices(self.tokenizer, params.choices)
            except ValueError as e:
                return None, None, f"choices: {e}"
            return ChoiceRun(list(params.choices), choice_ids, params.normalize), None, None
        kind, value = params.constraint  # type: ignore[misc]
        try:
            compiled = compile_constraint(kind, value, tokenizer_info(self.tokenizer))  # type: ignore[arg-type]
            return None, compiled.new_state(), None
        except ConstraintError as e:
            return None, None, f"{kind}: {e}"

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop these requests, queued, running or finished but not yet returned, and free their
        blocks (a shard given up while others keep running)."""
        drop = set(request_ids)
        # A classification row's children (its multi-token choices) go with it.
        drop |= {r.request_id for r in self.scheduler.holding + list(self.scheduler.waiting)
                 if isinstance(r.scoring, ChoiceChild) and r.scoring.parent.request_id in drop}
        self.scheduler.abort(drop)
        if not self.scheduler.has_unfinished():
            self._drop_copies()
        for rid in drop:
            self._streams.pop(rid, None)
        self._finished = [o for o in self._finished if o.request_id not in drop]

    def abort_all(self) -> None:
        """Drop every queued and running request and free their blocks (an abandoned shard)."""
        self.scheduler.abort_all()
        self._drop_copies()
        self._streams.clear()
        self._finished = []

    def _drop_copies(self) -> None:
        # No request is left to run the step that would make the queued block copies: their
        # destinations are free again, and their sources must not stay held.
        self.blocks.copies_done(self.blocks.take_copies())

    @property
    def num_waiting(self) -> int:
        """Requests queued but not admitted yet: a caller feeding the engine adds more when this is 0."""
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished)

    def step(self) -> list[CompletionOutput]:
        """Run one scheduled step; return the requests that finished (in any order)."""
        decode, prefill = self.scheduler.schedule()
        if self.lora is not None:  # each adapter's decode rows side by side: few runs to update
            decode.sort(key=lambda r: r.lora_slot)
        reqs = decode + prefill
        if reqs:
            # Block copies of forked classification rows (flex) first; else keep the blocks in use
            # packed at the low ids (decode attention reads up to the top one).
            copies = self.blocks.take_copies()
            moves = copies or self.blocks.compact(self.scheduler.holding)
            tokens, logprobs = self.runner.run(decode, prefill, moves)
            self.blocks.copies_done(copies)
            scored = [(req, self.runner.spans[i][0]) for i, req in enumerate(reqs) if req.scoring is not None]
            if scored:  # every classification row of the step in one go
                classify.score_step(scored, self.runner.step_logits)
            for i, (req, tok) in enumerate(zip(reqs, tokens)):
                if req.scoring is not None:
                    self._scored(req)
                    continue
                req.token_ids.append(tok)
                if req.params.logprobs and logprobs is not None:
                    req.logprobs.append(logprobs[i])
                self._check_finished(req, tok)
        done, self._finished = self._finished, []
        return done

    def _scored(self, req: Request) -> None:
        """After a classification request's step (``classify.score_step`` scored it): a row with
        its branches is done; on the flex backend a row forks a plain child per multi-token choice,
        and the row is done when its last child is."""
        if isinstance(req.scoring, ChoiceChild):
            self.scheduler.finish(req)
            run = req.scoring.run
            run.pending -= 1
            if run.pending == 0:
                self._finish_parent(req.scoring.parent)
            return
        run: ChoiceRun = req.scoring
        forks = ([] if req.branch_starts is not None else
                 [(kid, self.blocks.fork(req, req.num_cached, len(kid)))
                  for kid in classify.plain_children(req, run, self.max_model_len, self.device)])
        run.pending = len(forks)
        for kid, table in forks:
            if table is None:  # no free blocks: the child waits and prefills its prompt too
                self.scheduler.add(kid)
                continue
            kid.block_table, kid.num_cached = table, req.num_cached
            self.scheduler.add_ready(kid)
        self.scheduler.finish(req)  # the row's own hold on its blocks; children keep theirs
        if not forks:
            self._finish_parent(req)

    def _finish_parent(self, req: Request) -> None:
        req.finish_reason = "stop"
        req.status = Status.FINISHED
        self._finished.append(req.to_output())

    def _constraint_reason(self, req: Request, tok: int) -> Optional[str]:
        """A constrained row's finish reason after ``tok`` (None: it goes on)."""
        state = req.constraint_state
        if not state.accept(tok) or state.error is not None:
            req.error = f"constraint: {state.error or f'token {tok} is not allowed here'}"
            return "error"
        if state.is_terminated():  # the document ended (or EOS was taken), also with ignore_eos
            return "stop"
        if len(req) >= req.max_total_len:
            req.error = state.length_error()  # None when what it wrote is already complete
            return "length"
        return None

    def _check_finished(self, req: Request, tok: int) -> None:
        p = req.params
        reason = None
        stream = self._streams.get(req.request_id)
        if req.constraint_state is not None:
            reason = self._constraint_reason(req, tok)
            if stream is not None and tok != self.eos_id:
                stream[0].add(tok)
        elif (tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            # The stop token is generated but, like EOS in every reference, not part of the text.
            reason = "stop"
        if stream is not None and reason is None and req.constraint_state is None:
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

